"""Compile time of the train step: lowering vs XLA compile per task function and the update.

  python -m benchmarks.compile --config configs/tiny.py
  python -m benchmarks.compile --config configs/challenge.py --lower_only   # 2-core CPU
  python -m benchmarks.compile --config configs/challenge.py --layouts config,unrolled \
      --noconcurrent   # the scanned layers against the unrolled structure, in one run

Builds the trainer's ``per_task_jit`` step (`tbgc_jax.trainer.step.PerTaskStep`) on abstract
parameters and padded batches of the config's training shapes (nothing is allocated, no data is
read), then for each task's ``value_and_grad`` and for the update prints:
- ``lower``: tracing + lowering to StableHLO (Python: flax/jax tracing of the unrolled layers);
- ``ops``: StableHLO ops of the lowered module (grows with unrolled depth);
- ``compile``: XLA compile of that module, one at a time (the baseline: what the first step
  of ``train.py`` costs with a cold cache), and its optimised-HLO instruction count;
``--layouts config,unrolled`` measures the config as given and, as the baseline, the same
config with every repeated layer unrolled (`unrolled_layout`: the backbone's ``scan_blocks``
and the heads' ``scan_layers`` off, the structure before scanning), then prints them side by
side. Then the wall time of compiling all of them at once in threads (`PerTaskStep.compile`, what
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
import statistics
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from tbgc_jax.trainer.export import abstract_step, op_count


def _define_flags() -> None:
  """Defined when run as a script only: tests and benchmarks import `stablehlo_ops`."""
  global _CONFIG, _LOWER_ONLY, _OPTIONS, _STEP_TIME, _ROUNDS, _CONCURRENT, _CONCURRENT_ONLY
  global _LAYOUTS
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Trainer config file.")
  _LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Lower only (no XLA compile).")
  _LAYOUTS = flags.DEFINE_list(
      "layouts", ["config"], "Layouts to measure, in one run: config (as given), unrolled "
      "(every scan_blocks / scan_layers off: the baseline).")
  _OPTIONS = flags.DEFINE_list("options", ["default"], "XLA:CPU option sets (OPTION_SETS).")
  _STEP_TIME = flags.DEFINE_bool("step_time", False, "Also time steps (real data; tiny config).")
  _ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds of step timing.")
  _CONCURRENT = flags.DEFINE_bool("concurrent", True, "Also compile all functions in threads.")
  _CONCURRENT_ONLY = flags.DEFINE_bool("concurrent_only", False,
                                       "Only the concurrent compile (used in a fresh process).")


OPTION_SETS = {
    "default": {},
    "fast": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
    "o1": {"xla_backend_optimization_level": 1},
    "noexpensive": {"xla_llvm_disable_expensive_passes": True},
    "o1_noexpensive": {"xla_backend_optimization_level": 1,
                       "xla_llvm_disable_expensive_passes": True},
}


def unrolled_layout(config):
  """``config`` with every repeated layer unrolled: the backbone's ``scan_blocks`` and the
  heads' ``scan_layers`` off (a copy; ``config`` is left as it is)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if c.model.get("backbone_overrides") is not None:
      c.model.backbone_overrides["scan_blocks"] = False
    for task in ("det", "seg"):
      head = c.model.get(task)
      if head is not None and head.get("overrides") is not None:
        head.overrides["scan_layers"] = False
  return c


def stablehlo_ops(lowered) -> int:
  """Number of ops of a lowered function's StableHLO module (``jit(f).lower(...)``)."""
  return op_count(lowered.as_text())


def hlo_ops(compiled) -> int:
  """Number of instructions of a compiled function's optimised HLO."""
  text = compiled.as_text() or ""
  return sum(1 for line in text.splitlines() if " = " in line)


def measure_layout(config, layout: str) -> dict[str, dict[str, float]]:
  """Lowers (and, unless ``--lower_only``, compiles) every function of one layout; prints a
  table per step and returns ``{function: {"ops", "lower", "compile <opt>", "hlo <opt>"}}``."""
  step, state, rest, batches, outs = abstract_step(config)
  fns = {f"grad[{t}]": (step.task_grads[t], (state["params"], rest, batches[t], state["rng"],
                                              state["step"])) for t in step.tasks}
  fns["update"] = (step.update, (state, outs))
  results: dict[str, dict[str, float]] = {name: {} for name in fns}
  lowered = {}
  print(f"\nlayout {layout!r}")
  print(f"{'function':12s} {'lower s':>8s} {'stablehlo ops':>14s}")
  for name, (fn, args) in fns.items():
    t0 = time.perf_counter()
    lowered[name] = fn.lower(*args)
    secs = time.perf_counter() - t0
    results[name].update(lower=secs, ops=stablehlo_ops(lowered[name]))
    print(f"{name:12s} {secs:8.1f} {results[name]['ops']:14d}", flush=True)
  if _LOWER_ONLY.value:
    return results
  for opt in _OPTIONS.value:
    options = OPTION_SETS[opt]
    total = 0.0
    print(f"\nXLA compile, layout {layout!r}, options {opt!r} {options or ''}")
    print(f"{'function':12s} {'compile s':>9s} {'hlo instrs':>11s}")
    cpu0 = time.process_time()
    for name, low in lowered.items():
      t0 = time.perf_counter()
      c = low.compile(compiler_options=options)
      secs = time.perf_counter() - t0
      total += secs
      results[name].update({f"compile {opt}": secs, f"hlo {opt}": hlo_ops(c)})
      print(f"{name:12s} {secs:9.1f} {results[name][f'hlo {opt}']:11d}", flush=True)
    print(f"{'sum':12s} {total:9.1f}   (one after the other; process CPU "
          f"{time.process_time() - cpu0:.1f} s)")
  return results


def measure(config) -> None:
  import jax

  print(f"{jax.devices()[0].platform}, {os.cpu_count()} cpu(s), jax {jax.__version__}; "
        f"backbone {config.model.backbone}, det {config.model.det.preset}, "
        f"seg {config.model.seg.preset}", flush=True)
  layouts = {"config": config, "unrolled": unrolled_layout(config)}
  unknown = set(_LAYOUTS.value) - set(layouts)
  if unknown:
    raise app.UsageError(f"--layouts: unknown {sorted(unknown)}, expected among "
                         f"{sorted(layouts)}")
  results = {name: measure_layout(layouts[name], name) for name in _LAYOUTS.value}
  if len(results) > 1:
    first, *others = results
    print(f"\nside by side ({', '.join(results)}; ratio: {others[-1]!r} / {first!r})")
    keys = ["ops"] + ([] if _LOWER_ONLY.value else
                      [f"{kind} {opt}" for opt in _OPTIONS.value for kind in ("compile", "hlo")])
    for key in keys:
      print(f"{key:16s}" + "".join(f" {name:>12s}" for name in results) + f" {'ratio':>7s}")
      rows = {fn: [r[fn][key] for r in results.values()] for fn in results[first]}
      if key.startswith("compile"):
        rows["sum"] = [sum(r[fn][key] for fn in r) for r in results.values()]
      for fn, values in rows.items():
        cells = "".join(f" {v:12.1f}" if isinstance(v, float) else f" {v:12d}" for v in values)
        print(f"  {fn:14s}{cells} {values[-1] / max(values[0], 1e-9):7.2f}")
  if not _LOWER_ONLY.value and _CONCURRENT.value:
    for opt in _OPTIONS.value:
      # A fresh process: jax keeps executables in memory, even across jax.clear_caches().
      argv = [a for a in sys.argv
              if not a.startswith(("--options", "--concurrent_only", "--layouts"))]
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
