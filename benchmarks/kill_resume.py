"""Kill/resume trials: ``train.py`` interrupted at random moments ends bitwise where an
uninterrupted run ends.

Each trial runs ``train.py`` on a small config and interrupts it ``--kills`` times: SIGKILL
after a random delay ("time"), SIGKILL while an asynchronous checkpoint save is in flight
("save": as soon as orbax's temporary checkpoint directory appears), SIGKILL once the log
reaches a random step ("step"), or SIGTERM, a preemption notice ("sigterm": the run must
checkpoint and exit 0). After each interruption it reruns the same command, until a run
exits 0. It then compares with an uninterrupted run: the final parameters, optimizer state,
step, rng and counters (bitwise), the grain data-iterator states and the run counters
(byte for byte), and ``metrics.jsonl`` (each step once, the same values).

  python -m benchmarks.kill_resume --trials 10 --kills 3 --workdir /tmp/kill_resume [--tasks cls]

All runs share one persistent compilation cache (``<workdir>/jax_cache``): restarts load
the executables the first run compiled, as a restarted production job would.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "micro_config.py"
MODES = ("time", "save", "step", "sigterm")
# Fast XLA:CPU compiles; every run of a comparison uses the same flags.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Log fields that measure time, not training.
TIMING = ("step_time", "data_wait")


def train_command(workdir: str, overrides: tuple[str, ...] = ()) -> list[str]:
  """The command line of one run (the same for the first run and every restart)."""
  return [sys.executable, str(ROOT / "train.py"), "--config", str(CONFIG),
          "--workdir", workdir, *overrides]


def train_env(cache_dir: str) -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS,
              JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


@dataclasses.dataclass
class Launch:
  """One process of a trial: how it was interrupted and how it ended."""

  mode: str | None  # None: left to finish
  returncode: int
  seconds: float
  fired: bool  # the interruption was sent before the process ended on its own
  log_tail: str
  checkpoints: list[int]  # finalized checkpoint steps when it ended


def _log_steps(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.strip())


def _saving(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def launch(cmd: list[str], env: dict, workdir: str, mode: str | None, rng: np.random.Generator,
           *, expected_seconds: float, total_steps: int, timeout: float = 900.0) -> Launch:
  """Runs ``cmd`` once, interrupting it according to ``mode``."""
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, "launches.log")
  t0 = time.perf_counter()
  with open(log_path, "a") as log:
    log.write(f"\n=== launch, mode {mode}\n")
    log.flush()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    fired = False
    delay = rng.uniform(0.0, expected_seconds)
    # A log row this launch writes: rows of an earlier launch are there from the start.
    low = min(_log_steps(workdir) + 1, total_steps - 1)
    target_step = int(rng.integers(low, total_steps))
    while proc.poll() is None:
      elapsed = time.perf_counter() - t0
      if elapsed > timeout:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"{cmd} ran over {timeout} s; see {log_path}")
      if mode is not None and not fired:
        due = {"time": elapsed >= delay, "save": _saving(workdir),
               "step": _log_steps(workdir) >= target_step,
               "sigterm": _log_steps(workdir) >= target_step}[mode]
        if due:
          proc.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
          fired = True
      time.sleep(0.002)
  with open(log_path) as f:
    tail = f.read()[-3000:]
  ckpt = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []
  return Launch(mode, proc.returncode, time.perf_counter() - t0, fired, tail, steps)


def run_trial(workdir: str, env: dict, modes: list[str], rng: np.random.Generator, *,
              expected_seconds: float, total_steps: int, overrides: tuple[str, ...] = ()
              ) -> list[Launch]:
  """Runs until a launch exits 0, interrupting the first ``len(modes)`` launches."""
  cmd = train_command(workdir, overrides)
  launches = []
  for mode in [*modes, None]:
    result = launch(cmd, env, workdir, mode, rng, expected_seconds=expected_seconds,
                    total_steps=total_steps)
    launches.append(result)
    killed = result.fired and mode != "sigterm"  # a preemption notice must exit 0
    if result.returncode != 0 and not killed:
      raise RuntimeError(f"launch {len(launches)} (mode {mode}) failed with code "
                         f"{result.returncode}:\n{result.log_tail}")
    if result.returncode == 0 and _finished(workdir):
      break
  if not _finished(workdir):
    raise RuntimeError(f"{workdir}: no finished run after {len(launches)} launches")
  return launches


def _finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "eval_metrics.json"))


def final_checkpoint(workdir: str) -> dict:
  """The newest checkpoint of a run: ``{"state": numpy pytree, "files": {item/file: bytes}}``."""
  import jax
  import orbax.checkpoint as ocp

  ckpt = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  base = os.path.join(ckpt, str(step))
  path = os.path.join(base, "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    # As host numpy arrays: the saving run's devices (other processes') need not exist here.
    tree = checkpointer.metadata(path).item_metadata.tree
    state = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  files = {}
  for item in sorted(os.listdir(base)):
    if item.startswith("data_") or item == "counters":
      for path in sorted(glob.glob(os.path.join(base, item, "*"))):
        if not path.endswith("commit_success.txt"):
          files[os.path.relpath(path, base)] = Path(path).read_bytes()
  return {"step": step, "state": state, "files": files}


def differences(got_dir: str, want_dir: str) -> list[str]:
  """What differs between the final checkpoints and logs of two runs (empty: none)."""
  got, want = final_checkpoint(got_dir), final_checkpoint(want_dir)
  out = []
  if got["step"] != want["step"]:
    out.append(f"final step {got['step']} != {want['step']}")
  out += state_differences(got["state"], want["state"])
  if got["files"] != want["files"]:
    out.append(f"data-iterator/counter files differ: {sorted(got['files'])} vs "
               f"{sorted(want['files'])}")
  rows = {d: log_rows(d) for d in (got_dir, want_dir)}
  steps = [r["step"] for r in rows[got_dir]]
  if steps != sorted(set(steps)):
    out.append(f"metrics.jsonl repeats or misorders steps: {steps}")
  if rows[got_dir] != rows[want_dir]:
    out.append("metrics.jsonl rows differ from the uninterrupted run's")
  return out


def state_differences(got: dict, want: dict) -> list[str]:
  """Paths of the leaves of two state pytrees that are not bitwise equal."""
  import jax

  g_leaves = jax.tree_util.tree_leaves_with_path(got)
  w_leaves = jax.tree_util.tree_leaves_with_path(want)
  if [p for p, _ in g_leaves] != [p for p, _ in w_leaves]:
    return ["state tree structures differ"]
  out = []
  for (path, a), (_, b) in zip(g_leaves, w_leaves, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      out.append(f"state{jax.tree_util.keystr(path)} differs")
  return out


def log_rows(workdir: str) -> list[dict]:
  """``metrics.jsonl`` rows without the timing fields."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def reference_run(workdir: str, env: dict, overrides: tuple[str, ...] = ()) -> float:
  """The uninterrupted run; returns its wall time in seconds."""
  t0 = time.perf_counter()
  result = subprocess.run(train_command(workdir, overrides), env=env, capture_output=True,
                          text=True, timeout=900, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"reference run failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
  return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--kills", type=int, default=3, help="interruptions per trial")
  parser.add_argument("--modes", default=",".join(MODES), help="drawn from, per interruption")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/kill_resume")
  parser.add_argument("--total_steps", type=int, default=12)
  parser.add_argument("--tasks", default="seg,cls", help="comma-separated tasks to train")
  args = parser.parse_args()
  for name in os.listdir(args.workdir) if os.path.isdir(args.workdir) else []:
    if name != "jax_cache":  # a warm cache changes no result, only the start-up time
      shutil.rmtree(os.path.join(args.workdir, name))
  env = train_env(os.path.join(args.workdir, "jax_cache"))
  tasks = tuple(args.tasks.split(","))
  overrides = (f"--config.total_steps={args.total_steps}", f"--config.tasks={tasks!r}")
  reference = os.path.join(args.workdir, "reference")
  reference_run(reference, env, overrides)  # also fills the compilation cache
  expected = reference_run(os.path.join(args.workdir, "reference_warm"), env, overrides)
  rng = np.random.default_rng(args.seed)
  modes = args.modes.split(",")
  ok = 0
  for trial in range(args.trials):
    chosen = [str(m) for m in rng.choice(modes, size=args.kills)]
    workdir = os.path.join(args.workdir, f"trial{trial}")
    launches = run_trial(workdir, env, chosen, rng, expected_seconds=expected,
                         total_steps=args.total_steps, overrides=overrides)
    diff = differences(workdir, reference)
    ok += not diff
    fired = [f"{x.mode}{'' if x.fired else ' (ended first)'}" for x in launches if x.mode]
    print(f"trial {trial}: launches {len(launches)}, interruptions {fired}: "
          f"{'bitwise equal' if not diff else diff}", flush=True)
  print(f"{ok}/{args.trials} trials bitwise equal to the uninterrupted run")
  sys.exit(0 if ok == args.trials else 1)


if __name__ == "__main__":
  main()
