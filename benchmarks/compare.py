r"""Which multi-task method wins: every method (and single-task baselines) on two benchmarks.

Benchmarks, both offline and minutes per run on a 2-core CPU:

- ``qm9``: 11 QM9 regression targets (`benchmarks.qm9`), data from the ``qm9pack``
  wheel. LibMTL's QM9 model is a message-passing net on the molecular graph, hours of GPU
  time on 110,000 molecules; here a 2-layer MLP reads a fixed, standard descriptor (the
  sorted Coulomb-matrix spectrum and atom counts) computed once from the shipped geometries,
  with LibMTL's linear per-target heads, on the split scaled down 10x.
- ``embedded3``: the project's embedded three-task data (classification, detection scenes,
  segmentation; `benchmarks.embedded3`) with a small shared CNN.

Each method is the first link of ``optax.chain(method, optax.adam(lr))`` fed per-task
gradients (and losses); the single-task baselines train one model per task with Adam. The
score is LibMTL's :math:`\Delta_m\% = \frac{100}{T}\sum_t (-1)^{l_t}
(M_{m,t} - M_{b,t}) / M_{b,t}`, ``l_t = 1`` where lower is better, against the single-task
metrics averaged over seeds; reported as mean and 95% t-interval over seeds.

  python -m benchmarks.compare run --out results/compare.jsonl \
      [--benchmarks qm9,embedded3] [--methods all] [--seeds 0,1,2,3,4] [--steps 0]
  python -m benchmarks.compare report --results results/compare.jsonl \
      --plot docs/figures/comparison.png

``run`` appends one JSON line per finished (benchmark, method, task, seed, steps, config)
and skips those already in the file, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

import tbgc_jax
from benchmarks.problem import Problem

BENCHMARKS = ("qm9", "embedded3")
DEFAULT_STEPS = {"qm9": 1000, "embedded3": 400}
MAX_NORM = 0.1  # S of the clipping methods (the paper's value).
_RUNS: dict[tuple, Callable] = {}  # compiled training runs, see `train`.
BACKBONE = tbgc_jax.path_mask("^backbone/")


def make_problem(name: str) -> Problem:
  if name == "qm9":
    from benchmarks import qm9
    return qm9.problem()
  if name == "embedded3":
    from benchmarks import embedded3
    return embedded3.problem()
  raise ValueError(f"unknown benchmark {name!r}; known: {BENCHMARKS}")


def method_hyperparameters(problem: Problem, name: str, seed: int) -> dict[str, Any]:
  """The hyperparameters this benchmark gives registered method ``name``.

  Every method runs with its defaults, except: ``max_norm`` where required (the clipping
  methods) is the paper's ``MAX_NORM``; ``steps_per_epoch`` (DWA) is the benchmark's epoch;
  ``seed`` (random methods) is the run's seed.
  """
  method = tbgc_jax.get_method(name)
  hp = {}
  if "max_norm" in method.required:
    hp["max_norm"] = MAX_NORM
  if "steps_per_epoch" in method.hyperparameters:
    hp["steps_per_epoch"] = problem.steps_per_epoch
  if "seed" in method.hyperparameters:
    hp["seed"] = seed
  return hp


def train(problem: Problem, method: str, seed: int, steps: int, lr: float = 1e-3,
          task: str | None = None) -> dict[str, Any]:
  """Trains one model and scores it.

  Args:
    problem: the benchmark.
    method: a registered method name (`tbgc_jax.method_names`), or ``"single"`` (with
      ``task``): that task alone, with the ``"none"`` method (its gradient, unchanged).
    seed: seeds the parameters, the batches and any randomness of the method.
    steps: optimizer steps.
    lr: Adam's learning rate.
    task: for ``method="single"``, the task.

  Returns:
    ``{"metrics": {task: value}, "final_losses": {task: mean loss of the last 10% of
    steps}, "seconds": wall time}``.
  """
  start = time.perf_counter()
  tasks = (task,) if method == "single" else problem.tasks
  name = "none" if method == "single" else method

  def make_tx(seed):
    hp = method_hyperparameters(problem, name, seed)
    return optax.chain(tbgc_jax.make_method(name, BACKBONE, tasks=tasks, **hp), optax.adam(lr))

  init_key, data_key = jax.random.split(jax.random.key(seed))
  params = problem.init(init_key)
  opt_state = make_tx(seed).init(params)
  # One compiled run per (problem, method, task, steps, lr), whatever the seed: a method's
  # seed only enters its initial state (randomness lives in the state), passed in here.
  cache_key = (id(problem), name, tasks, steps, lr)
  if cache_key not in _RUNS:
    tx = make_tx(0)
    grad_fn = tbgc_jax.per_task_value_and_grad({t: problem.loss_fns[t] for t in tasks})

    def step(carry, key):
      params, opt_state = carry
      losses, grads = grad_fn(params, problem.sample(key, tasks))
      updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
      return (optax.apply_updates(params, updates), opt_state), losses

    def run(params, opt_state, key):
      (params, _), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
      return params, losses

    _RUNS[cache_key] = jax.jit(run)
  params, losses = _RUNS[cache_key](params, opt_state, data_key)
  tail = max(1, steps // 10)
  final = {t: float(np.mean(np.asarray(losses[t])[-tail:])) for t in tasks}
  metrics = problem.evaluate(params)
  if method == "single":
    metrics = {task: metrics[task]}
  return {"metrics": metrics, "final_losses": final,
          "seconds": round(time.perf_counter() - start, 2)}


# ------------------------------------------------------------------ results file
def _run_key(rec: Mapping[str, Any]) -> str:
  return json.dumps([rec["benchmark"], rec["method"], rec.get("task"), rec["seed"],
                     rec["steps"], rec["lr"], rec["config"]], sort_keys=True)


def read_results(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def environment() -> dict[str, str]:
  import flax

  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                     f"{jax.devices()[0].platform}"}


def run_grid(out: str, benchmarks: Sequence[str | Problem], methods: Sequence[str] | None,
             seeds: Sequence[int], steps: int = 0, lr: float = 1e-3,
             log: Callable[..., None] = print) -> list[dict[str, Any]]:
  """Runs every (benchmark, method or single-task baseline, seed) not yet in ``out``.

  Args:
    out: JSONL results file, appended to.
    benchmarks: names from ``BENCHMARKS`` (or `Problem` instances).
    methods: registered method names, plus ``"single"`` for the single-task baselines
      (None: all of them).
    seeds: random seeds.
    steps: optimizer steps per run (0: the benchmark's default).
    lr: Adam's learning rate.
    log: called with one line per run (and ``flush=True``), like ``print``.

  Returns:
    The records written by this call.
  """
  done = {_run_key(r) for r in read_results(out)}
  written, env = [], environment()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  for bench in benchmarks:
    problem = bench if isinstance(bench, Problem) else make_problem(bench)
    bench = problem.name
    n_steps = steps or DEFAULT_STEPS[bench]
    # The single-task baselines first: every finished method then has its Δm%, so an
    # interrupted grid already reports what it ran.
    names = ["single", *tbgc_jax.method_names()] if methods is None else list(methods)
    unknown = set(names) - set(tbgc_jax.method_names()) - {"single"}
    if unknown:
      raise ValueError(f"unknown methods {sorted(unknown)}")
    jobs = [(m, t) for m in names for t in (problem.tasks if m == "single" else (None,))]
    for method, task in jobs:  # method-major: each compiled run serves every seed in turn
      for seed in seeds:
        rec = {"benchmark": bench, "method": method, "task": task, "seed": seed,
               "steps": n_steps, "lr": lr, "config": dict(problem.config)}
        if _run_key(rec) in done:
          continue
        rec.update(train(problem, method, seed, n_steps, lr, task), env=env)
        with open(out, "a") as f:
          f.write(json.dumps(rec) + "\n")
        done.add(_run_key(rec))
        written.append(rec)
        label = method if task is None else f"{method}:{task}"
        log(f"{bench} {label} seed={seed} {rec['seconds']}s "
            + " ".join(f"{k}={v:.4g}" for k, v in rec["metrics"].items()), flush=True)
  return written


# ------------------------------------------------------------------ report
def _interval(values: Sequence[float]) -> tuple[float, float]:
  """Mean and half-width of the 95% Student-t interval (0 for one value)."""
  from scipy import stats

  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), 0.0
  half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
  return float(v.mean()), float(half)


def delta_m(metrics: Mapping[str, float], baseline: Mapping[str, float],
            higher_better: Mapping[str, bool]) -> float:
  """LibMTL's Delta_m%: mean over tasks of the signed relative change, in percent."""
  terms = [(1.0 if higher_better[t] else -1.0) * (metrics[t] - baseline[t]) / baseline[t]
           for t in baseline]
  return 100.0 * float(np.mean(terms))


def summarize(records: Sequence[Mapping[str, Any]], higher_better: Mapping[str, Mapping[str, bool]]
              ) -> dict[str, dict[str, Any]]:
  """Per benchmark and method: per-task mean/CI, Delta_m% mean/CI over seeds, seeds used.

  Only records with the benchmark's most common step count are used. The single-task
  baseline of task t is the mean of its seeds; a method's Delta_m% is computed per seed
  against it. Methods appear only where every single-task baseline is present.
  """
  out = {}
  for bench in sorted({r["benchmark"] for r in records}):
    recs = [r for r in records if r["benchmark"] == bench]
    steps = max({r["steps"] for r in recs}, key=lambda s: sum(r["steps"] == s for r in recs))
    recs = [r for r in recs if r["steps"] == steps]
    hb = higher_better[bench]
    single = {t: [r["metrics"][t] for r in recs if r["method"] == "single" and r["task"] == t]
              for t in hb}
    rows = {}
    if all(single.values()):
      base = {t: float(np.mean(v)) for t, v in single.items()}
      rows["single"] = {"tasks": {t: _interval(v) for t, v in single.items()},
                        "delta_m": (0.0, 0.0), "seeds": min(len(v) for v in single.values())}
    for method in sorted({r["method"] for r in recs} - {"single"}):
      mrecs = [r for r in recs if r["method"] == method]
      row = {"tasks": {t: _interval([r["metrics"][t] for r in mrecs]) for t in hb},
             "seeds": len(mrecs), "delta_m": None}
      if "single" in rows:
        row["delta_m"] = _interval([delta_m(r["metrics"], base, hb) for r in mrecs])
      rows[method] = row
    out[bench] = {"steps": steps, "rows": rows}
  return out


def markdown(summary: Mapping[str, Any]) -> str:
  """Tables: per benchmark, one row per method, sorted by Delta_m% (best first)."""
  lines = []
  for bench, s in summary.items():
    rows = s["rows"]
    if not rows:
      continue
    tasks = list(next(iter(rows.values()))["tasks"])
    lines += [f"### {bench} ({s['steps']} steps)", "",
              "| method | seeds | Δm% | " + " | ".join(tasks) + " |",
              "|---|---|---|" + "---|" * len(tasks)]
    order = sorted(rows, key=lambda m: -(rows[m]["delta_m"] or (-1e9, 0))[0])
    for m in order:
      r = rows[m]
      pm = r["seeds"] > 1  # no interval from one seed
      dm = ("n/a" if r["delta_m"] is None else f"{r['delta_m'][0]:+.2f}"
            + (f" ± {r['delta_m'][1]:.2f}" if pm else ""))
      cells = [f"{mu:.4g}" + (f" ± {h:.2g}" if pm else "") for mu, h in r["tasks"].values()]
      lines.append(f"| {m} | {r['seeds']} | {dm} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: str, caption: str) -> None:
  """One panel per benchmark: Delta_m% per method with its 95% interval."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  benches = [b for b in summary if any(r["delta_m"] for r in summary[b]["rows"].values())]
  fig, axes = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 4.2), squeeze=False)
  for ax, bench in zip(axes[0], benches, strict=True):
    rows = {m: r for m, r in summary[bench]["rows"].items() if r["delta_m"] is not None}
    order = sorted(rows, key=lambda m: rows[m]["delta_m"][0])
    mu = [rows[m]["delta_m"][0] for m in order]
    half = [rows[m]["delta_m"][1] for m in order]
    colors = ["tab:red" if m.startswith("tbgc") else "tab:gray" if m == "single"
              else "tab:blue" for m in order]
    labels = [f"{m} ({rows[m]['seeds']})" for m in order]
    ax.barh(labels, mu, xerr=half, color=colors, capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_title(f"{bench}: {summary[bench]['steps']} steps")
    ax.set_xlabel("Δm% vs single-task (higher is better); (n) = seeds")
  fig.text(0.01, 0.01, "\n".join(textwrap.wrap(caption, 150)), fontsize=7, va="bottom")
  fig.tight_layout(rect=(0, 0.12, 1, 1))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _higher_better() -> dict[str, dict[str, bool]]:
  from benchmarks import embedded3, qm9

  return {"qm9": {t: False for t in qm9.TASKS}, "embedded3": {t: True for t in embedded3.TASKS}}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p_run = sub.add_parser("run", help="train and score the missing runs")
  p_run.add_argument("--out", default="results/compare.jsonl")
  p_run.add_argument("--benchmarks", default=",".join(BENCHMARKS))
  p_run.add_argument("--methods", default="all",
                     help="comma-separated method names and/or 'single'; 'all' = every "
                          "method plus the single-task baselines")
  p_run.add_argument("--seeds", default="0,1,2,3,4")
  p_run.add_argument("--steps", type=int, default=0, help="0: each benchmark's default")
  p_run.add_argument("--lr", type=float, default=1e-3)
  p_rep = sub.add_parser("report", help="tables (markdown on stdout) and a plot")
  p_rep.add_argument("--results", default="results/compare.jsonl")
  p_rep.add_argument("--plot", default="")
  p_rep.add_argument("--command", default="", help="reproducing command, printed on the plot")
  args = parser.parse_args(argv)

  if args.command == "run":
    methods = None if args.methods == "all" else args.methods.split(",")
    run_grid(args.out, args.benchmarks.split(","), methods,
             [int(s) for s in args.seeds.split(",")], args.steps, args.lr)
  else:
    records = read_results(args.results)
    summary = summarize(records, _higher_better())
    print(markdown(summary))
    if args.plot:
      env = records[-1]["env"]
      caption = (f"{env['machine']}; jax {env['jax']}, flax {env['flax']}, optax "
                 f"{env['optax']}; mean and 95% interval over seeds. {args.command}")
      plot(summary, args.plot, caption)


if __name__ == "__main__":
  main()
