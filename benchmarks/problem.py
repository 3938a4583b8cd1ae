"""The interface of a multi-task benchmark of `benchmarks.compare` (`Problem`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Problem:
  """A multi-task benchmark: data on device, a model, per-task losses and metrics.

  Attributes:
    name: benchmark name.
    tasks: task names.
    higher_better: per task, whether its metric is better when higher.
    init: ``key -> params`` with backbone leaves under ``"backbone"``.
    loss_fns: ``{task: (params, batch) -> scalar}``.
    sample: ``(key, tasks) -> {task: batch}``, jittable.
    evaluate: ``params -> {task: metric}`` on held-out data (host side).
    steps_per_epoch: training-set size over batch size (DWA's epoch).
    config: settings that identify a run, written with its results.
  """

  name: str
  tasks: tuple[str, ...]
  higher_better: Mapping[str, bool]
  init: Callable[[jax.Array], Any]
  loss_fns: Mapping[str, Callable[[Any, Any], jax.Array]]
  sample: Callable[[jax.Array, Sequence[str]], Mapping[str, Any]]
  evaluate: Callable[[Any], Mapping[str, float]]
  steps_per_epoch: int
  config: Mapping[str, Any]
