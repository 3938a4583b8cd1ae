"""Compile time of the train step: lowering vs XLA compile per task function and the update.

  python benchmarks/compile.py --config configs/tiny.py
  python benchmarks/compile.py --config configs/challenge.py --lower_only   # 2-core CPU

Builds the trainer's ``per_task_jit`` step (`tbgc_jax.trainer.step.PerTaskStep`) on abstract
parameters and padded batches of the config's training shapes (nothing is allocated, no data is
read), then for each task's ``value_and_grad`` and for the update prints:
- ``lower``: tracing + lowering to StableHLO (Python: flax/jax tracing of the unrolled layers);
- ``ops``: StableHLO ops of the lowered module (grows with unrolled depth);
- ``compile``: XLA compile of that module, one at a time (the baseline: what the first step
  of ``train.py`` costs with a cold cache), and its optimised-HLO instruction count;
then the wall time of compiling all of them at once in threads (`PerTaskStep.compile`, what
the trainer does before the first step). With ``--options`` each XLA:CPU option set listed
(``fast``: ``xla_backend_optimization_level=0`` + ``xla_llvm_disable_expensive_passes``) is
compiled too, and with ``--step_time`` (tiny config) the step time of the executables from each
option set is measured, interleaved, on the real embedded-data batches.

Compiles go around the persistent cache (none is configured here), each option set compiles
once in this process and the concurrent compiles run in a fresh process, so every figure is a
cold compile. Times are wall-clock seconds; on a
shared machine compare ratios within one run, and the process CPU seconds (all threads), which
depend less on the other load.
"""

import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def _define_flags() -> None:
  """Defined when run as a script only: tests and benchmarks import `stablehlo_ops`."""
  global _CONFIG, _LOWER_ONLY, _OPTIONS, _STEP_TIME, _ROUNDS, _CONCURRENT, _CONCURRENT_ONLY
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Trainer config file.")
  _LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Lower only (no XLA compile).")
  _OPTIONS = flags.DEFINE_list("options", ["default"], "XLA:CPU option sets: default, fast.")
  _STEP_TIME = flags.DEFINE_bool("step_time", False, "Also time steps (real data; tiny config).")
  _ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds of step timing.")
  _CONCURRENT = flags.DEFINE_bool("concurrent", True, "Also compile all functions in threads.")
  _CONCURRENT_ONLY = flags.DEFINE_bool("concurrent_only", False,
                                       "Only the concurrent compile (used in a fresh process).")


OPTION_SETS = {
    "default": {},
    "fast": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
}


def abstract_step(config):
  """The trainer's per-task step on abstract state, and abstract inputs of each function.

  Returns:
    ``(step, state, rest, batches, outs)``: a `PerTaskStep`, ShapeDtypeStruct trees of the
    train state, the model's rng state, ``{task: batch}`` of the config's training shapes and
    ``{task: task_grads output}``.
  """
  import jax
  import numpy as np
  from flax import nnx

  from tbgc_jax.models.multitask import backbone_mask
  from tbgc_jax.models.rngs import construction_rngs
  from tbgc_jax.trainer.model_factory import build_model
  from tbgc_jax.trainer.optim import make_optimizer
  from tbgc_jax.trainer.setup import train_batch_shapes
  from tbgc_jax.trainer.sharding import make_mesh
  from tbgc_jax.trainer.step import make_train_step

  tasks = tuple(config.tasks)
  model = nnx.eval_shape(lambda: build_model(config, rngs=construction_rngs(config.seed)))
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


def stablehlo_ops(lowered) -> int:
  """Number of ops of a lowered function's StableHLO module (``jit(f).lower(...)``)."""
  return sum(1 for line in lowered.as_text().splitlines() if re.search(r"= \S+\.\S+", line))


def hlo_ops(compiled) -> int:
  """Number of instructions of a compiled function's optimised HLO."""
  text = compiled.as_text() or ""
  return sum(1 for line in text.splitlines() if " = " in line)


def measure(config) -> None:
  import jax

  step, state, rest, batches, outs = abstract_step(config)
  fns = {f"grad[{t}]": (step.task_grads[t], (state["params"], rest, batches[t], state["rng"],
                                              state["step"])) for t in step.tasks}
  fns["update"] = (step.update, (state, outs))
  print(f"{jax.devices()[0].platform}, {os.cpu_count()} cpu(s), jax {jax.__version__}; "
        f"backbone {config.model.backbone}, det {config.model.det.preset}, "
        f"seg {config.model.seg.preset}", flush=True)
  lowered = {}
  print(f"{'function':12s} {'lower s':>8s} {'stablehlo ops':>14s}")
  for name, (fn, args) in fns.items():
    t0 = time.perf_counter()
    lowered[name] = fn.lower(*args)
    secs = time.perf_counter() - t0
    print(f"{name:12s} {secs:8.1f} {stablehlo_ops(lowered[name]):14d}", flush=True)
  if _LOWER_ONLY.value:
    return
  for opt in _OPTIONS.value:
    options = OPTION_SETS[opt]
    total = 0.0
    print(f"\nXLA compile, options {opt!r} {options or ''}")
    print(f"{'function':12s} {'compile s':>9s} {'hlo instrs':>11s}")
    cpu0 = time.process_time()
    for name, low in lowered.items():
      t0 = time.perf_counter()
      c = low.compile(compiler_options=options)
      secs = time.perf_counter() - t0
      total += secs
      print(f"{name:12s} {secs:9.1f} {hlo_ops(c):11d}", flush=True)
    print(f"{'sum':12s} {total:9.1f}   (one after the other; process CPU "
          f"{time.process_time() - cpu0:.1f} s)")
    if _CONCURRENT.value:
      # A fresh process: jax keeps executables in memory, even across jax.clear_caches().
      argv = [a for a in sys.argv if not a.startswith(("--options", "--concurrent_only"))]
      subprocess.run([sys.executable, *argv, f"--options={opt}", "--concurrent_only"],
                     check=True)


def concurrent(config) -> None:
  """Wall time of `PerTaskStep.compile` (all functions compiled at once, in threads)."""
  step, state, rest, batches, _ = abstract_step(config)
  for opt in _OPTIONS.value:
    t0, cpu0 = time.perf_counter(), time.process_time()
    step.compile(state, rest, batches, compiler_options=OPTION_SETS[opt])
    print(f"{'concurrent':12s} {time.perf_counter() - t0:9.1f}   (options {opt!r}, fresh "
          f"process: PerTaskStep.compile, lowering + {len(step.tasks) + 1} compiles in "
          f"threads; process CPU {time.process_time() - cpu0:.1f} s)", flush=True)


def step_time(config) -> None:
  """Median step time of the executables of each option set, interleaved rounds."""
  import jax

  from benchmarks.step import _batches, _build
  from tbgc_jax.trainer.setup import Setup

  setup = Setup(config)
  batches = _batches(setup)
  runs = {}
  for opt in _OPTIONS.value:
    step, state = _build(setup, config)
    t0 = time.perf_counter()
    step = step.compile(state, setup.rest, batches[0], compiler_options=OPTION_SETS[opt])
    print(f"  compiled {opt!r} in {time.perf_counter() - t0:.1f} s (concurrent)", flush=True)
    for b in batches:  # warm up
      state, _ = step(state, setup.rest, b)
    jax.block_until_ready(state)
    runs[opt] = [step, state, []]
  for r in range(_ROUNDS.value):
    order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
    for opt in order:
      step, state, times = runs[opt]
      t0 = time.perf_counter()
      for b in batches:
        state, metrics = step(state, setup.rest, b)
      jax.block_until_ready((state, metrics))
      times.append((time.perf_counter() - t0) / len(batches))
      runs[opt][1] = state
  print(f"\nstep time, median of {_ROUNDS.value} rounds x {len(batches)} steps")
  base = statistics.median(runs[_OPTIONS.value[0]][2])
  for opt, (_, _, times) in runs.items():
    med = statistics.median(times)
    print(f"  {opt:8s} {med * 1e3:8.1f} ms/step  ({med / base:.2f} x {_OPTIONS.value[0]!r})")


def main(argv):
  del argv
  config = _CONFIG.value
  if _CONCURRENT_ONLY.value:
    concurrent(config)
    return
  measure(config)
  if _STEP_TIME.value:
    step_time(config)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
