r"""The trainer's functions lowered for GPU and TPU on any machine, and checked to be portable.

`jax.export` lowers a jitted function for platforms other than the one it runs on (CPU-only
jaxlib included); compiling still needs the device. `export_trainer` lowers what ``train.py``
and ``eval.py`` run for a config (each task's ``value_and_grad`` of the per-task step, the
update, each task's evaluation forward) on abstract parameters and padded batches (nothing is
allocated, no data is read, no pretrained file is loaded) and reports, per function and
platform, the StableHLO op count and the custom-call targets. A function is *portable* when it
lowers and holds no host callback and no CPU-only custom call (LAPACK, DUCC FFT, ...):

  python -m tbgc_jax.trainer.export --config configs/tiny.py [--platforms cuda,tpu]
  python -m tbgc_jax.trainer.export --config configs/challenge.py

exits with status 1 and names the functions that are not portable.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

PLATFORMS = ("cuda", "tpu")

# Custom-call targets that only the CPU runtime provides, and host callbacks (which tie the
# step to the host: a transfer and a Python call per step).
_NOT_PORTABLE = re.compile(r"^(lapack_|ducc_|cpu_)|callback")
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.$-]+)")
_OP = re.compile(r"= \S+\.\S+")


@dataclasses.dataclass(frozen=True)
class Lowering:
  """One function lowered for one platform.

  Attributes:
    function: the function's name (``grad[det]``, ``update``, ``predict[seg]``, ...).
    platform: ``cuda``, ``tpu``, ... or several joined by commas (one multi-platform module).
    ops: StableHLO ops of the module (0 when it did not lower).
    custom_calls: the custom-call targets in the module, sorted.
    error: why it did not lower (for example a host callback), or None.
  """

  function: str
  platform: str
  ops: int
  custom_calls: tuple[str, ...]
  error: str | None = None

  @property
  def problems(self) -> list[str]:
    """What makes the function not portable to the platform (empty: portable)."""
    found = [f"custom call {c!r} is CPU-only or a host callback"
             for c in self.custom_calls if _NOT_PORTABLE.search(c)]
    return ([f"does not lower: {self.error}"] if self.error else []) + found


def op_count(module_text: str) -> int:
  """Number of ops of a StableHLO module's text (``Lowered.as_text()``, ``mlir_module()``)."""
  return sum(1 for line in module_text.splitlines() if _OP.search(line))


def lower(fn: Callable[..., Any], args: Sequence[Any], platforms: str | Sequence[str],
          name: str) -> Lowering:
  """Lowers the jitted ``fn`` on ``args`` (arrays or ShapeDtypeStructs) for ``platforms``:
  one platform, or several at once (one module with a branch per platform, one trace)."""
  platforms = (platforms,) if isinstance(platforms, str) else tuple(platforms)
  platform = ",".join(platforms)
  try:
    text = jax.export.export(fn, platforms=platforms)(*args).mlir_module()
  except (ValueError, NotImplementedError) as e:  # e.g. a callback on a foreign platform
    return Lowering(name, platform, 0, (), f"{type(e).__name__}: {str(e).splitlines()[0]}")
  return Lowering(name, platform, op_count(text), tuple(sorted(set(_CUSTOM_CALL.findall(text)))))


def abstract_model(config: Any) -> nnx.Module:
  """The config's multi-task model with ShapeDtypeStruct parameters (`nnx.eval_shape`)."""
  from tbgc_jax.models.rngs import construction_rngs
  from tbgc_jax.trainer.model_factory import build_model
  return nnx.eval_shape(lambda: build_model(config, rngs=construction_rngs(config.seed)))


def abstract_step(config: Any):
  """The trainer's per-task step on abstract state, and abstract inputs of each function.

  Returns:
    ``(step, state, rest, batches, outs)``: a `tbgc_jax.trainer.step.PerTaskStep`,
    ShapeDtypeStruct trees of the train state, the model's rng state, ``{task: batch}`` of
    the config's training shapes and ``{task: task_grads output}``.
  """
  from tbgc_jax.models.multitask import backbone_mask
  from tbgc_jax.trainer.optim import make_optimizer
  from tbgc_jax.trainer.setup import train_batch_shapes
  from tbgc_jax.trainer.sharding import make_mesh
  from tbgc_jax.trainer.step import make_train_step

  tasks = tuple(config.tasks)
  model = abstract_model(config)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, schedules = make_optimizer(config, tasks, backbone_mask, 1000, 100)
  state = {"step": jax.ShapeDtypeStruct((), np.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params),
           "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
  mesh = make_mesh(config)
  batches = train_batch_shapes(config, mesh)
  step = make_train_step(graphdef, tasks, tx, schedules, config, backbone_mask, mesh, state,
                         rest)
  outs = {t: jax.eval_shape(step.task_grads[t], params, rest, batches[t], state["rng"],
                            state["step"]) for t in tasks}
  return step, state, rest, batches, outs


def trainer_functions(config: Any) -> dict[str, tuple[Callable[..., Any], tuple]]:
  """``{name: (jitted function, abstract args)}`` of what ``train.py`` and ``eval.py`` run:
  ``grad[<task>]`` and ``update`` of the per-task step, ``predict[<task>]`` of evaluation
  (at ``config.data.<task>.eval_image_size``)."""
  from tbgc_jax.trainer.evaluate import make_predict_fn
  from tbgc_jax.trainer.setup import train_batch_shapes
  from tbgc_jax.trainer.sharding import make_mesh

  step, state, rest, batches, outs = abstract_step(config)
  fns = {f"grad[{t}]": (step.task_grads[t], (state["params"], rest, batches[t], state["rng"],
                                              state["step"])) for t in step.tasks}
  fns["update"] = (step.update, (state, outs))
  evaluation = config.copy_and_resolve_references()
  for t in evaluation.tasks:
    evaluation.data[t].image_size = evaluation.data[t].eval_image_size
  mesh = make_mesh(config)
  eval_batches = train_batch_shapes(evaluation, mesh)
  model = abstract_model(config)
  model.eval()
  graphdef, params, eval_rest = nnx.split(model, nnx.Param, ...)
  for t in step.tasks:
    fns[f"predict[{t}]"] = (make_predict_fn(graphdef, t, mesh), (params, eval_rest,
                                                                  eval_batches[t]))
  return fns


def export_trainer(config: Any, platforms: Sequence[str] = PLATFORMS) -> list[Lowering]:
  """Lowers every function of `trainer_functions` for ``platforms``, all in one module each
  (every platform's custom calls appear in it)."""
  return [lower(fn, args, platforms, name)
          for name, (fn, args) in trainer_functions(config).items()]


def table(lowerings: Sequence[Lowering]) -> str:
  """A markdown table: one row per function, StableHLO ops and custom calls per platform."""
  platforms = list(dict.fromkeys(low.platform for low in lowerings))
  rows = {}
  for low in lowerings:
    rows.setdefault(low.function, {})[low.platform] = low
  head = "| function | " + " | ".join(f"{p} ops | {p} custom calls" for p in platforms) + " |"
  lines = [head, "|---|" + "---:|---|" * len(platforms)]
  for name, by in rows.items():
    cells = " | ".join(f"{by[p].ops} | {', '.join(by[p].custom_calls) or '-'}"
                       for p in platforms)
    lines.append(f"| {name} | {cells} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags

  config = flags.FLAGS.config
  platforms = [p for p in flags.FLAGS.platforms.split(",") if p]
  lowerings = export_trainer(config, platforms)
  print(table(lowerings))
  bad = [(low, p) for low in lowerings for p in low.problems]
  for low, problem in bad:
    print(f"{low.function} for {low.platform}: {problem}", file=sys.stderr)
  if bad:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "The trainer config file.",
                                  lock_config=False)
  flags.DEFINE_string("platforms", ",".join(PLATFORMS), "Comma-separated target platforms.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
