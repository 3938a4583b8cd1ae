"""Training logs: JSONL and TensorBoard scalars, the non-finite check, and end-of-run plots."""

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np


class MetricWriter:
  """Writes scalar rows to ``workdir/metrics.jsonl`` and TensorBoard event files.

  Only the host with ``jax.process_index() == 0`` should write; others pass ``enabled=False``.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


def check_finite(step: int, metrics: Mapping[str, float], tasks: Sequence[str]) -> None:
  """Raises on a non-finite task loss, naming the step and the task (never trains through)."""
  for task in tasks:
    value = metrics.get(f"{task}/loss")
    if value is not None and not math.isfinite(value):
      raise FloatingPointError(
          f"non-finite loss at step {step} for task {task!r}: {value}. The last checkpoint "
          "before it is kept; lower the learning rate or max norm, or check that task's data.")


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

  rows = read_jsonl(jsonl_path)
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

  if any(f"{t}/backbone_grad_norm" in rows[-1] for t in tasks):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for t in tasks:
      axes[0].plot(steps, series(f"{t}/backbone_grad_norm"), label=t)
      axes[1].plot(steps, series(f"{t}/backbone_grad_norm_after"), label=t)
    axes[0].set(xlabel="step", ylabel="backbone gradient norm", yscale="log",
                title="Per-task backbone gradient norm (raw)")
    axes[1].set(xlabel="step", yscale="log", title="... after the gradient method")
    axes[0].legend()
    path = os.path.join(out_dir, "backbone_grad_norm.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

  # Per-task weights of a Gramian gradient method (tbgc_jax.gradient_diagnostics, logged as
  # grad/weight/<task>).
  if any(f"grad/weight/{t}" in rows[-1] for t in tasks):
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in tasks:
      ax.plot(steps, series(f"grad/weight/{t}"), label=t)
    ax.set(xlabel="step", ylabel="weight", title="Per-task weight of the gradient method")
    ax.legend()
    path = os.path.join(out_dir, "task_weights.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
  return written
