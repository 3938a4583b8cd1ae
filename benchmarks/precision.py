"""bfloat16 against float32 compute: the tiny config's losses over 50 steps, and the per-task
gradient executables' temporary memory.

  python -m benchmarks.precision --workdir /tmp/precision [--steps 50]

Trains the tiny config (``configs/tiny.py``, embedded data) for ``--steps`` steps from the same
seed with ``config.precision`` "float32" and "bfloat16" (`train_and_evaluate`, no evaluation,
a loss logged every step), then compares each task's losses:

- step 0 (same parameters, same batch): the relative difference is the rounding of one
  forward pass in bf16 alone;
- the mean over the last 10 steps: the two runs have drifted apart by then (each step's
  rounding changes the next step's parameters), so the check is that bf16 trains as float32
  does, within ``--tolerance`` relative.

Then compiles each task's gradient executable (the trainer's per-task step, its input shapes)
in both precisions and reports ``memory_analysis().temp_size_in_bytes``. Writes
``<workdir>/precision.json`` and prints a markdown table; exits 1 when a task is out of
tolerance.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

PRECISIONS = ("float32", "bfloat16")


def tiny_config(precision: str, steps: int):
  from configs import tiny

  c = tiny.get_config()
  c.precision = precision
  c.total_steps = steps
  c.log_every = 1
  c.checkpoint_every = steps
  c.mesh_devices = 1
  return c


def losses(workdir: str, tasks) -> dict[str, np.ndarray]:
  """``{task: loss per step}`` from a run's metrics.jsonl."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rows = [r for r in rows if f"{tasks[0]}/loss" in r]
  rows.sort(key=lambda r: r["step"])
  return {t: np.asarray([r[f"{t}/loss"] for r in rows]) for t in tasks}


def temp_bytes(config) -> dict[str, int]:
  """``{task: temp bytes}`` of the per-task gradient executables of ``config``."""
  from tbgc_jax.trainer.export import abstract_step

  step, state, rest, batches, _ = abstract_step(config)
  return {t: int(step.task_grads[t].lower(state["params"], rest, batches[t], state["rng"],
                                          state["step"]).compile()
                 .memory_analysis().temp_size_in_bytes) for t in step.tasks}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--tolerance", type=float, default=0.1,
                      help="relative tolerance on the mean loss of the last 10 steps")
  args = parser.parse_args()
  from tbgc_jax.trainer.setup import use_compilation_cache
  from tbgc_jax.trainer.train import train_and_evaluate

  use_compilation_cache(args.workdir)
  runs, memory = {}, {}
  for precision in PRECISIONS:
    config = tiny_config(precision, args.steps)
    run_dir = os.path.join(args.workdir, precision)
    train_and_evaluate(config, run_dir, evaluate=False)
    runs[precision] = losses(run_dir, tuple(config.tasks))
    memory[precision] = temp_bytes(config)
  tasks = tuple(runs["float32"])
  report, ok = {"steps": args.steps, "tolerance": args.tolerance, "tasks": {}}, True
  print("| task | step 0 f32 | step 0 bf16 | rel. diff | last-10 mean f32 | last-10 mean bf16 | "
        "rel. diff | grad temp MiB f32 | grad temp MiB bf16 |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for t in tasks:
    f, b = runs["float32"][t], runs["bfloat16"][t]
    first = abs(b[0] - f[0]) / abs(f[0])
    last_f, last_b = float(np.mean(f[-10:])), float(np.mean(b[-10:]))
    last = abs(last_b - last_f) / abs(last_f)
    ok &= last <= args.tolerance
    mib = {p: memory[p][t] / 2**20 for p in PRECISIONS}
    report["tasks"][t] = {"step0": [float(f[0]), float(b[0]), first],
                          "last10": [last_f, last_b, last], "temp_mib": mib,
                          "float32": f.tolist(), "bfloat16": b.tolist()}
    print(f"| {t} | {f[0]:.4f} | {b[0]:.4f} | {first:.2%} | {last_f:.4f} | {last_b:.4f} | "
          f"{last:.2%} | {mib['float32']:.1f} | {mib['bfloat16']:.1f} |")
  report["versions"] = {"jax": jax.__version__}
  with open(os.path.join(args.workdir, "precision.json"), "w") as fh:
    json.dump(report, fh, indent=1)
  print("within tolerance" if ok else f"OUT OF TOLERANCE ({args.tolerance:.0%})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
