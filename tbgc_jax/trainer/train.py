"""``train_and_evaluate(config, workdir)``: the multi-task trainer with TBGC (paper's Algorithm 1).

One step takes one batch per task. Inside one jitted, donated step: per task, forward and
``jax.grad`` of that task's loss (one task's activations alive at a time), the gradient method
(any registered name: ``tbgc_jax.method_names()``), then AdamW with the backbone learning rate
multiplier. Data parallel over a ``jax.sharding.Mesh`` of all devices; orbax checkpoints of the
model, optimizer and grain iterator states with automatic resume; JSONL/TensorBoard logs and
plots; the evaluations of ``config.evals`` during training and at the end.

This module is the loop, a short sequence of named parts: `StopSignals` (SIGTERM, Ctrl-C),
`initial_state` (resume, ``init_from`` or initialisation), `TrainLog` (periodic metric
flushes), `PeriodicEvals`, and the checkpoint saves. Their building blocks: `setup` (config
checks, mesh, model), `checkpointing`, `lock`, `sharding`, `step`, `optim`, `logs`,
`evaluate`.
"""

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

import tbgc_jax
from tbgc_jax.data import pipeline
from tbgc_jax.data.fields import pop_counts
from tbgc_jax.models.multitask import backbone_mask
from tbgc_jax.tasks import get_task
from tbgc_jax.trainer import checkpointing, logs, sharding
from tbgc_jax.trainer import evaluate as eval_lib
from tbgc_jax.trainer import setup as setup_lib
from tbgc_jax.trainer.lock import WorkdirLock
from tbgc_jax.trainer.optim import make_optimizer
from tbgc_jax.trainer.setup import Setup, max_consecutive_nonfinite, schedule_lengths
from tbgc_jax.trainer.step import PerTaskStep, make_train_step

_log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130  # the shell's status for a run stopped by Ctrl-C (128 + SIGINT)


class Interrupted(Exception):  # noqa: N818 - what happened, not a failure
  """The run was stopped by Ctrl-C (SIGINT) after writing the checkpoint of ``step``."""

  def __init__(self, step: int):
    super().__init__(f"interrupted: checkpoint of step {step} written; rerun the same command "
                     "to resume")
    self.step = step


class StopSignals:
  """SIGTERM (a preemption notice) and Ctrl-C turned into "checkpoint at the next step
  boundary".

  On several processes, orbax's ``reached_preemption`` (jax's preemption sync service, which
  handles SIGTERM itself) agrees on one step for all of them; on one process Python signal
  handlers set a flag: SIGTERM, and the first SIGINT (the second SIGINT aborts at once, with
  ``KeyboardInterrupt``). Call `reached` at every step boundary, on every process.
  """

  def __init__(self, mngr: ocp.CheckpointManager):
    self._mngr = mngr
    self.reason: str | None = None  # "sigterm" or "sigint" once asked to stop
    self._previous: dict[int, Any] = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT:
      if self.reason == "sigint":
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
      print("\nCtrl-C: finishing this step and writing a checkpoint (Ctrl-C again aborts "
            "at once)", file=sys.stderr, flush=True)
      self.reason = "sigint"
    else:
      self.reason = self.reason or "sigterm"

  @property
  def requested(self) -> bool:
    return self.reason is not None

  def reached(self, step: int) -> bool:
    if self._mngr.reached_preemption(step):
      self.reason = self.reason or "sigterm"
    return self.requested

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


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
  params = sum(x.size for x in jax.tree.leaves(setup.abstract_params))
  takes_max_norm = "max_norm" in tbgc_jax.get_method(config.grad.method).hyperparameters
  grad = config.grad.method + (f" (max_norm {config.grad.max_norm:g})" if takes_max_norm else "")
  modes = setup_lib.augment_modes(config)
  augment = (next(iter(modes.values())) if len(set(modes.values())) == 1 else
             ", ".join(f"{t} {m}" for t, m in modes.items())) if modes else "none"
  n = len(setup.tasks)
  lines = [f"{n} task{'s' * (n != 1)} on {devices} {jax.devices()[0].platform} device(s); "
           f"workdir {workdir}"]
  lines += [f"  {t:5s} {len(sources[t]):,} train examples, {config.data[t].batch_size} per device "
            f"per step" for t in setup.tasks]
  lines += [f"  model: InternImage {config.model.backbone!r} + heads, {params / 1e6:.1f} M "
            f"parameters; gradient method: {grad}; augmentation: {augment}",
            f"  {total_steps:,} steps ({total_steps / steps_per_epoch:g} epochs of "
            f"{steps_per_epoch:,}), seed {config.seed}"]
  return "\n".join(lines)


def train_iterators(setup: Setup, sources: dict, total_steps: int) -> dict:
  """Each task's grain training iterator (enough epochs for ``total_steps``), this host's
  shard of the global stream."""
  config, iterators = setup.config, {}
  for t in setup.tasks:
    per_host = len(sources[t]) // jax.process_count()
    epochs = math.ceil(total_steps * setup.local_batch_size(t) / per_host) + 1
    spec = get_task(t).data
    iterators[t] = pipeline.train_iterator(
        config.data[t], spec, seed=config.seed + 1000 * (spec.stream + 1), num_epochs=epochs,
        batch_size=setup.local_batch_size(t), num_workers=int(config.num_workers),
        shard_index=jax.process_index(), shard_count=jax.process_count(), source=sources[t])
  return iterators


def initial_state(setup: Setup, tx, mngr: ocp.CheckpointManager, iterators: dict, workdir: str
                  ) -> tuple[dict, dict[str, int]]:
  """The train state to start from, and the records skipped so far per task (this process).

  The newest intact checkpoint of ``workdir`` if there is one (restored into abstract
  targets, after `checkpointing.check_resumable`); else ``config.init_from``'s parameters
  (and optimizer state); else the initialisation (with the pretrained backbone).
  """
  config, tasks = setup.config, setup.tasks
  rep = setup.replicated
  abstract = {
      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
      "params": setup.abstract_params,
      "opt_state": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                jax.eval_shape(tx.init, setup.abstract_params)),
      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
  }
  skipped = {t: 0 for t in tasks}
  if mngr.latest_step() is not None:
    checkpointing.check_resumable(mngr, config, abstract, workdir)
    restored, latest = checkpointing.restore_latest_intact(
        mngr, checkpointing.restore_args(abstract, iterators), workdir)
    if restored is not None:
      saved = restored["counters"]["data_skipped"]
      is_main = jax.process_index() == 0
      skipped = {t: int(saved[t][jax.process_index()]) if len(saved[t]) == jax.process_count()
                 else int(sum(saved[t])) * is_main for t in tasks}
      if config.get("init_from", ""):
        _log.warning("config.init_from is ignored: %s has checkpoints (resumed from step %d)",
                     workdir, latest)
      _log.info("resumed from step %d in %s", latest, workdir)
      return restored["state"], skipped
  params, opt_state = setup.params, None
  if config.get("init_from", ""):
    params, opt_state, fresh = checkpointing.load_init_from(
        setup, str(config.init_from), str(config.get("init_from_parts", "params")),
        abstract["opt_state"])
    if fresh:
      _log.warning("init_from %s: %d parameter arrays are not in the source and start from "
                   "their initialisation: %s", config.init_from, len(fresh), ", ".join(fresh))
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": opt_state if opt_state is not None else jax.jit(tx.init)(params),
      "rng": jax.random.PRNGKey(config.seed),
  }
  return jax.device_put(state, rep), skipped


class TrainLog:
  """The training metrics between flushes, and their flush: fetched from the device at once,
  checked (the non-finite policy), written (`logs.MetricWriter`), counted in ``summary``.

  Args:
    writer: the run's metric writer.
    tasks: task names.
    max_consecutive: the non-finite policy's limit (`setup.max_consecutive_nonfinite`).
  """

  def __init__(self, writer: logs.MetricWriter, tasks, max_consecutive: int):
    self.writer, self.tasks, self.max_consecutive = writer, tuple(tasks), max_consecutive
    self.pending: list[tuple[int, Any, float, dict[str, int], dict[str, int]]] = []
    self._t = time.perf_counter()
    self.summary = {"tasks": list(tasks), "dropped_steps": {t: 0 for t in tasks},
                    "data_skipped": {t: 0 for t in tasks}, "skipped_by_process": {}}
    self.last_losses: dict[str, float] = {}

  def add(self, step: int, metrics: Any, data_wait: float, skipped: dict[str, int],
          dropped: dict[str, int]) -> None:
    """One step's metrics (left on the device until the next flush), the records skipped so far
    per task and the batches' drop counters (``<task>/num_dropped_<field>``, this process)."""
    self.pending.append((step, metrics, data_wait, dict(skipped), dict(dropped)))

  def flush(self) -> None:
    """Writes the pending rows. Raises `FloatingPointError` under the non-finite policy."""
    if not self.pending:
      return
    from jax.experimental import multihost_utils

    tasks, pending = self.tasks, self.pending
    fetched = jax.device_get([m for _, m, _, _, _ in pending])
    # Every process's skip counts (the same flush steps on all of them).
    by_process = np.asarray(multihost_utils.process_allgather(
        np.asarray([[c[t] for t in tasks] for _, _, _, c, _ in pending], np.int64)))
    by_process = by_process.reshape(jax.process_count(), len(pending), len(tasks))
    # The batches' drop counters (``num_dropped_<field>``), summed over the processes.
    drop_keys = sorted(pending[0][4])
    drops = np.zeros((len(pending), 0), np.int64)
    if drop_keys:
      drops = np.asarray(multihost_utils.process_allgather(
          np.asarray([[d[k] for k in drop_keys] for *_, d in pending], np.int64)))
      drops = drops.reshape(jax.process_count(), len(pending), len(drop_keys)).sum(0)
    now = time.perf_counter()
    wall = (now - self._t) / len(pending)
    self._t = now
    for i, ((step, _, wait, _, _), metrics) in enumerate(zip(pending, fetched, strict=True)):
      row = {k: float(v) for k, v in metrics.items()}
      dropped = logs.check_nonfinite(step, row, tasks, self.max_consecutive)
      for t in dropped:
        _log.warning("step %d: task %r has a non-finite loss or gradient (loss %s): dropped "
                     "from this update (%d dropped steps in a row, %d in all; stop at %d)",
                     step, t, row[f"{t}/loss"], row[f"{t}/dropped_streak"],
                     row[f"{t}/dropped_total"], self.max_consecutive)
      row.update({f"{t}/data_skipped": float(by_process[:, i, k].sum())
                  for k, t in enumerate(tasks)})
      row.update({k: float(v) for k, v in zip(drop_keys, drops[i], strict=True)})
      row.update(step_time=wall, data_wait=wait)
      self.writer.write(step, row)
    self.summary["dropped_steps"] = {t: int(row[f"{t}/dropped_total"]) for t in tasks}
    self.summary["data_skipped"] = {t: int(by_process[:, -1, k].sum())
                                    for k, t in enumerate(tasks)}
    self.summary["skipped_by_process"] = {t: by_process[:, -1, k].tolist()
                                          for k, t in enumerate(tasks)}
    self.last_losses = {t: float(fetched[-1][f"{t}/loss"]) for t in tasks}
    pending.clear()


class PeriodicEvals:
  """The evaluations of ``config.evals`` (`eval_lib.eval_specs`): each every its ``every``
  steps during training, and all of them after the last step.

  Args:
    evaluation: the run's `eval_lib.Evaluation` (compiled prediction functions, sources).
    specs: ``{name: EvalSpec}``.
    writer: the run's metric writer (rows of ``<split>/<name>/<metric>``, ``val/score``).
  """

  def __init__(self, evaluation: eval_lib.Evaluation, specs, writer: logs.MetricWriter):
    self.evaluation, self.specs, self.writer = evaluation, dict(specs), writer
    self.results: dict[str, tuple[int, dict[str, float]]] = {}  # name -> (steps done, metrics)

  def due(self, done: int, *, last: bool) -> dict:
    """The evaluations to run after ``done`` steps (``last``: the run's last step)."""
    return {n: e for n, e in self.specs.items()
            if (e.every and done % e.every == 0) or (last and e.every)}

  def run(self, state: dict, rest: Any, specs: dict, done: int, log_step: int | None
          ) -> dict[str, float]:
    """Runs ``specs`` on ``state``'s parameters; logs them at ``log_step`` (None: no row)."""
    if not specs:
      return {}
    if jax.process_index() == 0:
      print(f"\nevaluating {', '.join(specs)} after step {done}...", flush=True)
    metrics = self.evaluation.run(state["params"], rest, specs)
    for name in specs:
      self.results[name] = (done, {k: v for k, v in metrics.items()
                                   if k.startswith(f"{name}/")})
    if log_step is not None:
      row = {}
      for k, v in metrics.items():
        name = k.split("/", 1)[0]
        row[f"{specs[name].split}/{k}" if name in specs else f"val/{k}"] = v
      self.writer.write(log_step, row)
    return metrics

  def final(self, state: dict, rest: Any, done: int) -> dict[str, float]:
    """Every evaluation after the last step (those run at that step already are reused)."""
    todo = {n: e for n, e in self.specs.items() if self.results.get(n, (None,))[0] != done}
    self.run(state, rest, todo, done, None)
    metrics = {}
    for name in self.specs:
      metrics.update(self.results[name][1])
    score = eval_lib.challenge_score(self.evaluation.tasks, self.specs, metrics)
    if score is not None:
      metrics["score"] = score
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None, evaluate: bool = True
                       ) -> dict[str, float]:
  """Trains on ``config`` in ``workdir`` (resuming from its latest checkpoint), then evaluates.

  Args:
    config: a trainer config (see ``configs/tiny.py``); not modified.
    workdir: where checkpoints, logs, plots and metrics go. One run at a time: the run holds
      ``<workdir>/train.lock`` (`lock.WorkdirLock`; process 0 for a group of processes).
    stop_after: stop (after checkpointing) once this step is reached, as a preemption would;
      a later call resumes. For tests and time-boxed jobs.
    evaluate: run the evaluations of ``config.evals`` after the last step (False: train only,
      besides the periodic evaluations).

  The evaluations (`eval_lib.eval_specs`; by default one per task on val every
  ``config.eval_every`` steps, 0: at the end only) go to the same logs as the training
  metrics, as ``<split>/<name>/<metric>`` and ``val/score`` in a row with the step of the
  last training row (0-based), before that step's checkpoint.

  Returns:
    The final evaluation metrics (empty if stopped early or not evaluated).

  Raises:
    Interrupted: stopped by Ctrl-C, after writing a checkpoint.
    lock.LockHeld: another run holds the workdir.
    setup.ConfigError: a config mistake, or a checkpoint of another config in ``workdir``.
  """
  setup = Setup(config)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(setup, workdir, stop_after=stop_after, evaluate=evaluate)


def _train(setup: Setup, workdir: str, *, stop_after: int | None, evaluate: bool
           ) -> dict[str, float]:
  config, tasks, is_main = setup.config, setup.tasks, jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  sources = {t: pipeline.make_source(config.data[t], get_task(t).data, "train") for t in tasks}
  steps_per_epoch, total_steps = schedule_lengths(setup, sources)
  iterators = train_iterators(setup, sources, total_steps)
  tx, schedules = make_optimizer(config, tasks, backbone_mask, total_steps, steps_per_epoch)
  mngr = checkpointing.checkpoint_manager(workdir, config)
  writer, signals = None, None
  # The bar starts after the first step, which compiles: its rate and ETA are the steps'.
  bar = tqdm(total=0, disable=True)
  try:
    state, skipped = initial_state(setup, tx, mngr, iterators, workdir)
    start = int(state["step"])
    last_step = min(total_steps, stop_after) if stop_after else total_steps
    jstep = make_train_step(setup.graphdef, tasks, tx, schedules, config, backbone_mask,
                            setup.mesh, state, setup.rest)
    writer = logs.MetricWriter(workdir, enabled=is_main, resume_step=start)
    log = TrainLog(writer, tasks, max_consecutive_nonfinite(config))
    evals = PeriodicEvals(eval_lib.Evaluation(config, setup.eval_graphdef, setup.mesh),
                          eval_lib.eval_specs(config), writer)
    if is_main and start < last_step:
      print(run_summary(setup, sources, total_steps, steps_per_epoch, workdir), flush=True)
      print("compiling the train step (a later run in this workdir loads it from jax_cache/)...",
            flush=True)
    abstract_batches = None
    if start < last_step:
      jstep, abstract_batches = compile_step(jstep, state, setup)
    signals = StopSignals(mngr)
    for step in range(start, last_step):
      t0 = time.perf_counter()
      host = {t: next(iterators[t]) for t in tasks}
      wait = time.perf_counter() - t0
      dropped = {}
      for t in tasks:
        skipped[t] += int(np.sum(host[t].pop("skipped")))
        dropped |= {f"{t}/{k}": v for k, v in pop_counts(host[t]).items()}
      batches = {t: sharding.global_batch(b, setup.data_sharding) for t, b in host.items()}
      if step == start and abstract_batches is not None:
        setup_lib.check_batches(batches, abstract_batches)
      state, metrics = jstep(state, setup.rest, batches)
      log.add(step, metrics, wait, skipped, dropped)
      if step == start:
        bar = tqdm(total=total_steps, initial=start, disable=not is_main, desc="train",
                   dynamic_ncols=True)
      bar.update(1)
      done = step + 1
      stopping = signals.reached(done)
      save = done % config.checkpoint_every == 0 or done == last_step or stopping
      if done % config.log_every == 0 or save:
        log.flush()  # raises under the non-finite policy before anything is saved
        bar.set_postfix({t: f"{v:.3g}" for t, v in log.last_losses.items()})
      due = {} if stopping else evals.due(done, last=evaluate and done == total_steps)
      if due:
        log.flush()
        evals.run(state, setup.rest, due, done, step)
      if save:
        mngr.save(done, args=checkpointing.save_args(
            state, iterators, config, {"data_skipped": log.summary["skipped_by_process"]}),
            force=stopping)
        if is_main:
          _write_summary(workdir, done, log.summary)
      if stopping:
        # Ctrl-C: the caller says so (`Interrupted`); a preemption notice is said here.
        (_log.info if signals.reason == "sigint" else _log.warning)(
            "%s: checkpoint of step %d written; rerun the same command to resume",
            "Ctrl-C" if signals.reason == "sigint" else "preemption notice", done)
        break
    log.flush()
  finally:
    if signals is not None:
      signals.close()
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if writer is not None:
      writer.close()
  done = int(state["step"])
  if signals is not None and signals.reason == "sigint":
    raise Interrupted(done)
  if done < total_steps:
    return {}
  return finish(setup, state, workdir, log, evals if evaluate else None)


def compile_step(jstep, state: dict, setup: Setup):
  """Compiles the train step for `setup_lib.train_batch_shapes` before the first batch is
  drawn (the data pipeline's read threads would otherwise run beside the compile and its
  Python tracing on the same cores). Returns the step and the batch shapes."""
  t0 = time.perf_counter()
  abstract_batches = setup_lib.train_batch_shapes(setup.config, setup.mesh)
  if isinstance(jstep, PerTaskStep):
    jstep.warm_up(state, setup.rest, abstract_batches)
  else:
    jstep = jstep.lower(state, setup.rest, abstract_batches).compile()
  if jax.process_index() == 0:
    print(f"compiled the train step in {time.perf_counter() - t0:.0f} s", flush=True)
  return jstep, abstract_batches


def finish(setup: Setup, state: dict, workdir: str, log: TrainLog,
           evals: PeriodicEvals | None) -> dict[str, float]:
  """The end of a run that reached its last step: ``summary.json``, the plots, and (with
  ``evals``) the final evaluations, written to ``eval_metrics.json`` and printed."""
  done, is_main = int(state["step"]), jax.process_index() == 0
  if is_main:
    _write_summary(workdir, done, log.summary)
    if os.path.exists(log.writer.path):
      logs.plot_training(log.writer.path, workdir, setup.tasks)
  if evals is None:
    return {}
  metrics = evals.final(state, setup.rest, done)
  if is_main:
    with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
      json.dump({"step": done, **metrics}, f, indent=2)
    print(eval_lib.format_table(metrics))
  return metrics
