"""Training logs: JSONL and TensorBoard scalars, the non-finite policy check, end-of-run plots."""

import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np


def route_library_logs(workdir: str, name: str, *, verbose: bool = False) -> str:
  """Sends every INFO log (jax, orbax, absl, the trainer) to ``workdir/<name>.log``.

  The terminal keeps warnings and errors, and what the trainer prints (config summary,
  progress bar, evaluation table); ``verbose`` shows the INFO lines there too. Call after
  absl has parsed flags (inside ``main``).

  Returns:
    The log file's path.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, f"{name}.log")
  handler = logging.FileHandler(path)
  handler.setFormatter(logging.Formatter(
      "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  handler.setLevel(logging.INFO)
  root = logging.getLogger()
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().setLevel(logging.INFO if verbose else logging.WARNING)
  except ImportError:
    pass
  return path


class MetricWriter:
  """Writes scalar rows to ``workdir/metrics.jsonl`` and TensorBoard event files.

  Only the host with ``jax.process_index() == 0`` should write; others pass ``enabled=False``.
  A run starting from the checkpoint of step ``resume_step`` (0: none) passes it: the rows
  of steps ``>= resume_step`` (written after that checkpoint by a run that stopped before its
  next one) are removed from the JSONL file and purged from TensorBoard, so that each step
  is logged once.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      truncate_jsonl(self.path, resume_step)
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def truncate_jsonl(path: str, first_dropped: int) -> int:
  """Keeps the rows of ``path`` with ``step < first_dropped`` (atomic rewrite).

  A row cut short by a kill (the file's last line) is dropped too.

  Returns:
    The number of rows removed.
  """
  if not os.path.exists(path):
    return 0
  kept, removed = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        removed += 1
        continue
      if row["step"] < first_dropped:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        removed += 1
  if removed:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return removed


def check_nonfinite(step: int, metrics: Mapping[str, float], tasks: Sequence[str],
                    max_consecutive: int) -> list[str]:
  """The host side of the non-finite policy, on one step's fetched metrics.

  Args:
    step: the step of ``metrics`` (0-based).
    metrics: that step's scalars (``task/<task>/nonfinite``, ``task/<task>/nonfinite_streak``
      of `tbgc_jax.method_diagnostics`, ``params_finite``, ``<task>/loss``).
    tasks: task names.
    max_consecutive: stop once a task was dropped in this many steps in a row.

  Returns:
    The tasks dropped from this step's update (the caller logs them).

  Raises:
    FloatingPointError: a parameter is non-finite, or a task reached ``max_consecutive``;
      the message names the step and the task. Raised before the state is checkpointed.
  """
  if not metrics.get("params_finite", 1):
    raise FloatingPointError(
        f"non-finite parameters after step {step}: stopping before they are checkpointed; "
        "the last checkpoint is intact. Lower the learning rate or check the data.")
  dropped = [t for t in tasks if metrics.get(f"task/{t}/nonfinite", 0)]
  for task in dropped:
    streak = int(metrics[f"task/{task}/nonfinite_streak"])
    if streak >= max_consecutive:
      raise FloatingPointError(
          f"task {task!r}: non-finite loss or gradient in {streak} consecutive steps (up to "
          f"step {step}, loss {metrics.get(f'{task}/loss')}); config.nonfinite."
          f"max_consecutive={max_consecutive}. Stopping before this state is checkpointed; "
          "the last checkpoint is intact. Lower the learning rate or max norm, or check that "
          "task's data.")
  return dropped


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training(jsonl_path: str, out_dir: str, tasks: Sequence[str]) -> list[str]:
  """PNG plots of per-task losses, per-task backbone gradient norms (the paper's Fig. 1) and,
  for Gramian gradient methods, the per-task weights over training.

  Returns:
    The paths written.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  # The training rows (evaluation rows hold only ``val/...`` metrics).
  rows = [r for r in read_jsonl(jsonl_path)
          if any(k != "step" and not k.startswith("val/") for k in r)]
  if not rows:
    return []
  steps = np.array([r["step"] for r in rows])

  def series(key):
    return np.array([r.get(key, np.nan) for r in rows], np.float64)

  written = []
  fig, ax = plt.subplots(figsize=(7, 4))
  for t in tasks:
    ax.plot(steps, series(f"{t}/loss"), label=t)
  ax.set(xlabel="step", ylabel="loss", title="Per-task training loss", yscale="log")
  ax.legend()
  path = os.path.join(out_dir, "loss.png")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  written.append(path)

  if any(f"task/{t}/backbone_grad_norm" in rows[-1] for t in tasks):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for t in tasks:
      axes[0].plot(steps, series(f"task/{t}/backbone_grad_norm"), label=t)
      axes[1].plot(steps, series(f"task/{t}/backbone_grad_norm_after"), label=t)
    axes[0].set(xlabel="step", ylabel="backbone gradient norm", yscale="log",
                title="Per-task backbone gradient norm (raw)")
    axes[1].set(xlabel="step", yscale="log", title="... after the gradient method")
    axes[0].legend()
    path = os.path.join(out_dir, "backbone_grad_norm.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

  # Per-task weights of a Gramian gradient method (tbgc_jax.method_diagnostics'
  # task/<task>/weight).
  if any(f"task/{t}/weight" in rows[-1] for t in tasks):
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in tasks:
      ax.plot(steps, series(f"task/{t}/weight"), label=t)
    ax.set(xlabel="step", ylabel="weight", title="Per-task weight of the gradient method")
    ax.legend()
    path = os.path.join(out_dir, "task_weights.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
  return written
