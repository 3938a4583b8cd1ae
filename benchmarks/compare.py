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
metrics averaged over seeds. The report (`benchmarks.stats`) gives Δm% with a 95% interval
that includes the single-task runs' seed noise (delta method, paired by seed), its
Holm-corrected test against 0, each method's rank with a bootstrap interval, and seed-paired,
Holm-corrected differences against the plain sum and between the clipping variants.

  python -m benchmarks.compare run --out results/compare.jsonl \
      [--benchmarks qm9,embedded3] [--methods all] [--seeds 0,1,2,3,4] [--steps 0]
  python -m benchmarks.compare report --results results/compare.jsonl \
      --plot docs/figures/comparison.png [--docs docs/comparison.md,README.md]

``run`` appends one JSON line per finished (benchmark, method, task, seed, steps, config)
and skips those already in the file, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

import tbgc_jax
from benchmarks import grid, stats
from benchmarks.problem import Problem

BENCHMARKS = ("qm9", "embedded3")
DEFAULT_STEPS = {"qm9": 1000, "embedded3": 400}
MAX_NORM = 0.1  # S of the clipping methods (the paper's value).
CLIPPING_METHODS = ("vanilla", "tbgc_star", "tbgc", "backbone_clip")
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

  Every method runs with its defaults, except: ``max_norm`` of the clipping methods
  (``CLIPPING_METHODS``) is the paper's ``MAX_NORM``; ``steps_per_epoch`` (DWA) is the
  benchmark's epoch; ``seed`` (random methods) is the run's seed.
  """
  method = tbgc_jax.get_method(name)
  hp = {}
  if name in CLIPPING_METHODS:
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
    log: called with one line per run, like ``print``.

  Returns:
    The records written by this call.
  """
  env, written = grid.environment(), []
  for bench in benchmarks:
    problem = bench if isinstance(bench, Problem) else make_problem(bench)
    n_steps = steps or DEFAULT_STEPS[problem.name]
    # The single-task baselines first: every finished method then has its Δm%, so an
    # interrupted grid already reports what it ran.
    names = ["single", *tbgc_jax.method_names()] if methods is None else list(methods)
    unknown = set(names) - set(tbgc_jax.method_names()) - {"single"}
    if unknown:
      raise ValueError(f"unknown methods {sorted(unknown)}; known: "
                       f"{['single', *tbgc_jax.method_names()]}")
    # Method-major: each compiled run serves every seed in turn.
    jobs = [{"benchmark": problem.name, "method": m, "task": t, "seed": seed,
             "steps": n_steps, "lr": lr, "config": dict(problem.config)}
            for m in names for t in (problem.tasks if m == "single" else (None,))
            for seed in seeds]

    def run(job, problem=problem):
      return {**job, **train(problem, job["method"], job["seed"], job["steps"], job["lr"],
                             job["task"]), "env": env}

    written += grid.run_grid(
        jobs, out, run, key=_run_key,
        label=lambda j: (f"{j['benchmark']} {j['method']}"
                         + (f":{j['task']}" if j["task"] else "") + f" seed={j['seed']}"),
        describe=lambda r: f"{r['seconds']}s " + " ".join(
            f"{k}={v:.4g}" for k, v in r["metrics"].items()),
        log=lambda line: log(line, flush=True))
  return written


# ------------------------------------------------------------------ report
TBGC_PAIRS = (("tbgc_star", "vanilla"), ("tbgc", "vanilla"), ("tbgc", "tbgc_star"),
              ("backbone_clip", "vanilla"), ("backbone_clip", "tbgc"))
PLAIN_SUM = "none"


def summarize(records: Sequence[Mapping[str, Any]], higher_better: Mapping[str, Mapping[str, bool]]
              ) -> dict[str, dict[str, Any]]:
  """Per benchmark: per method the per-task intervals, Δm% (baseline noise included), its
  Holm-corrected test against 0, rank with bootstrap interval, and paired differences.

  Only records with the benchmark's most common step count are used. Methods get Δm% only
  where every single-task baseline has runs.

  Returns:
    ``{benchmark: {"steps", "rows": {method: row}, "vs_plain": {method: (Paired, p_holm)},
    "pairs": {(a, b): (Paired, p_holm)}, "single_spread": Interval}}``; a row holds
    ``tasks`` (``{task: Interval}``), ``seeds``, ``delta_m`` (`stats.DeltaM` or None),
    ``p_holm`` and ``rank`` (`stats.Rank` or None).
  """
  out = {}
  for bench in sorted({r["benchmark"] for r in records}):
    recs = [r for r in records if r["benchmark"] == bench]
    steps = max({r["steps"] for r in recs}, key=lambda s: sum(r["steps"] == s for r in recs))
    recs = [r for r in recs if r["steps"] == steps]
    hb = higher_better[bench]
    single = {t: {r["seed"]: r["metrics"][t] for r in recs
                  if r["method"] == "single" and r["task"] == t} for t in hb}
    per_seed = {m: {r["seed"]: r["metrics"] for r in recs if r["method"] == m}
                for m in sorted({r["method"] for r in recs} - {"single"})}
    has_base = all(single.values())
    rows = {}
    if has_base:
      base = {t: float(np.mean(list(v.values()))) for t, v in single.items()}
      spread = stats.t_interval([
          stats.delta_m({t: single[t][s] for t in hb}, base, hb)
          for s in sorted(set.intersection(*(set(v) for v in single.values())))])
      rows["single"] = {"tasks": {t: stats.t_interval(list(v.values())) for t, v in single.items()},
                        "seeds": min(len(v) for v in single.values()), "delta_m": None,
                        "p_holm": math.nan, "rank": None}
    for m, seeds in per_seed.items():
      rows[m] = {"tasks": {t: stats.t_interval([v[t] for v in seeds.values()]) for t in hb},
                 "seeds": len(seeds), "rank": None, "p_holm": math.nan,
                 "delta_m": stats.delta_m_interval(seeds, single, hb) if has_base else None}
    summary = {"steps": steps, "rows": rows, "vs_plain": {}, "pairs": {}}
    if has_base:
      summary["single_spread"] = spread
      methods = [m for m in per_seed if rows[m]["delta_m"].n > 0]
      for m, p in zip(methods, stats.holm([rows[m]["delta_m"].p for m in methods]), strict=True):
        rows[m]["p_holm"] = float(p)
      # Ranked together: the methods that have every seed most methods have, on those seeds.
      base_seeds = set.intersection(*(set(v) for v in single.values()))
      common = {s for s in base_seeds
                if 2 * sum(s in per_seed[m] for m in methods) >= len(methods)}
      ranked = [m for m in methods if common <= set(per_seed[m])]
      if common and ranked:
        ranks = stats.bootstrap_ranks(
            {m: {s: per_seed[m][s] for s in common} for m in ranked}, single, hb)
        for m, r in ranks.items():
          rows[m]["rank"] = r
      summary["rank_seeds"] = len(common)
      seed_dm = {m: {s: stats.delta_m(v, base, hb) for s, v in per_seed[m].items()}
                 for m in methods}
      summary["vs_plain"] = _family({(m, PLAIN_SUM): None for m in methods if m != PLAIN_SUM},
                                    seed_dm)
      summary["pairs"] = _family({p: None for p in TBGC_PAIRS}, seed_dm)
    out[bench] = summary
  return out


def _family(pairs: Mapping[tuple[str, str], Any], values: Mapping[str, Mapping[int, float]]
            ) -> dict[tuple[str, str], tuple[stats.Paired, float]]:
  """Paired differences ``a - b`` of every pair whose two methods have values; Holm over them."""
  diffs = {(a, b): stats.paired(values[a], values[b]) for a, b in pairs
           if a in values and b in values}
  adjusted = stats.holm([d.p for d in diffs.values()])
  return {k: (d, float(p)) for (k, d), p in zip(diffs.items(), adjusted, strict=True)}


def _cell(iv: stats.Interval) -> str:
  return f"{iv.mean:.4g}" + (f" ± {iv.half:.2g}" if iv.n > 1 else "")


def _order(rows: Mapping[str, Any]) -> list[str]:
  """Methods by mean Δm%, best first; the single-task reference row after Δm% = 0."""
  def key(m):
    r = rows[m]
    return -(0.0 if m == "single" else r["delta_m"].mean if r["delta_m"] else -1e9)
  return sorted(rows, key=key)


def markdown(summary: Mapping[str, Any]) -> str:
  """The report: per benchmark the methods table, the paired table against the plain sum and
  the TBGC pairs, each with the caption that says how its numbers were computed."""
  return "\n".join(benchmark_markdown(bench, s) for bench, s in summary.items() if s["rows"])


def benchmark_markdown(bench: str, s: Mapping[str, Any]) -> str:
  """The three tables of one benchmark (see `markdown`)."""
  rows = s["rows"]
  tasks = list(next(iter(rows.values()))["tasks"])
  n_tests = sum(1 for r in rows.values() if not math.isnan(r["p_holm"]))
  lines = [f"### {bench} ({s['steps']} steps)", ""]
  if "single_spread" in s:
    sp = s["single_spread"]
    lines += [
        f"Δm%: mean ± 95% t-interval over seeds, with the single-task baselines' seed noise "
        f"included (delta method, paired by seed; the single-task runs' own Δm% against "
        f"their mean has a 95% t-interval of ± {sp.half:.2f} over {sp.n} seeds). p: t-test of "
        f"Δm% = 0, Holm-corrected over the {n_tests} methods. Rank by mean Δm% (1 = best) "
        f"with its 95% bootstrap interval ({stats.BOOTSTRAP_RESAMPLES:,} resamples of the "
        f"{s['rank_seeds']} seeds most methods have, RNG seed {stats.BOOTSTRAP_SEED}; methods "
        f"missing one of them are not ranked). Tasks: mean ± 95% "
        f"t-interval.", ""]
  lines += ["| method | seeds | Δm% | p (Holm) | rank | " + " | ".join(tasks) + " |",
            "|---|---|---|---|---|" + "---|" * len(tasks)]
  for m in _order(rows):
    r = rows[m]
    if m == "single":
      dm, rank = "0 (reference)", "-"
    elif r["delta_m"] is None:
      dm, rank = "n/a", "-"
    else:
      dm = stats.fmt_interval(r["delta_m"].mean, r["delta_m"].half, signed=True)
      if r["delta_m"].n != r["seeds"]:  # only the seeds the single-task runs have count
        dm += f" ({r['delta_m'].n} seeds)"
      rank = "-" if r["rank"] is None else (
          f"{r['rank'].rank:g} [{r['rank'].low:g}, {r['rank'].high:g}]")
    cells = [_cell(iv) for iv in r["tasks"].values()]
    lines.append(f"| {m} | {r['seeds']} | {dm} | {stats.fmt_p(r['p_holm'])} | {rank} | "
                 + " | ".join(cells) + " |")
  for title, fam, first in (
      (f"Paired by seed against the plain sum (`{PLAIN_SUM}`)", s["vs_plain"], "method"),
      ("The clipping variants, paired by seed", s["pairs"], "pair")):
    if not fam:
      continue
    lines += ["", f"{title}: difference of Δm% (mean ± 95% t-interval), seeds above / below "
              f"0, p of the paired t-test Holm-corrected over the {len(fam)} pairs of this "
              "table.", "", f"| {first} | seeds | difference | above/below | p (Holm) |",
              "|---|---|---|---|---|"]
    for (a, b), (d, p) in sorted(fam.items(), key=lambda kv: -kv[1][0].mean):
      name = a if first == "method" else f"{a} − {b}"
      lines.append(f"| {name} | {d.n} | {stats.fmt_interval(d.mean, d.half, signed=True)} | "
                   f"{stats.fmt_signs(d)} | {stats.fmt_p(p)} |")
  lines.append("")
  return "\n".join(lines)


def readme_table(summary: Mapping[str, Any], methods: Sequence[str]) -> str:
  """Δm% (mean ± 95% interval, baseline noise included) of ``methods`` on every benchmark."""
  benches = [b for b in summary if summary[b]["rows"]]
  lines = ["| method | " + " | ".join(f"{b} Δm%" for b in benches) + " |",
           "|---|" + "---|" * len(benches)]
  for m in methods:
    cells = []
    for b in benches:
      r = summary[b]["rows"].get(m)
      dm = r["delta_m"] if r else None
      cells.append("-" if dm is None else
                   f"{stats.fmt_interval(dm.mean, dm.half, signed=True)} ({dm.n})")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


OFF_SCALE = -30.0  # Δm% below which the plot's axis stops


def plot(summary: Mapping[str, Any], path: str, caption: str) -> None:
  """One panel per benchmark: Δm% per method with its 95% interval; ``caption`` is the stamp."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  benches = [b for b in summary if any(r["delta_m"] for r in summary[b]["rows"].values())]
  most = max(len(summary[b]["rows"]) for b in benches)
  fig, axes = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 1.8 + 0.2 * most),
                           squeeze=False)
  for ax, bench in zip(axes[0], benches, strict=True):
    rows = {m: r for m, r in summary[bench]["rows"].items() if r["delta_m"] is not None}
    order = sorted(rows, key=lambda m: rows[m]["delta_m"].mean)
    mu = [rows[m]["delta_m"].mean for m in order]
    half = [np.nan_to_num(rows[m]["delta_m"].half) for m in order]
    colors = ["tab:red" if m.startswith("tbgc") or m == "backbone_clip" else "tab:blue"
              for m in order]
    labels = [f"{m} ({rows[m]['delta_m'].n})" for m in order]
    ax.barh(labels, mu, xerr=half, color=colors, capsize=3)
    # A method that diverged would hide every other bar: the axis stops at OFF_SCALE and the
    # bars beyond it carry their value.
    lo = min(-1.0, *(m - h for m, h in zip(mu, half, strict=True) if m - h > OFF_SCALE))
    hi = max(1.0, *(m + h for m, h in zip(mu, half, strict=True)))
    ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    for y, m in enumerate(mu):
      if m - half[y] <= OFF_SCALE:
        ax.text(lo, y, f" {m:+.0f} ◀", va="center", ha="left", fontsize=7, color="w")
    ax.axvline(0, color="k", lw=0.8)
    if "single_spread" in summary[bench]:
      sp = summary[bench]["single_spread"].half
      ax.axvspan(-sp, sp, color="0.85", zorder=0)
    ax.set_title(f"{bench}: {summary[bench]['steps']} steps")
    ax.set_xlabel("Δm% vs single-task (higher is better); (n) = seeds of Δm%")
  grid.draw_stamp(fig, caption)
  fig.tight_layout(rect=(0, 0.5 / (1.8 + 0.2 * most), 1, 1))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _higher_better() -> dict[str, dict[str, bool]]:
  from benchmarks import embedded3, qm9

  return {"qm9": {t: False for t in qm9.TASKS}, "embedded3": {t: True for t in embedded3.TASKS}}


README_METHODS = ("tbgc_star", "tbgc", "backbone_clip", "fairgrad", "nash_mtl", "vanilla", "none")


def figure_stamp(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                 command: str) -> str:
  """Machine and versions of the runs, seeds and steps per benchmark, and the command."""
  envs = {json.dumps(r["env"], sort_keys=True) for r in records if "env" in r}
  env = json.loads(sorted(envs)[0]) if len(envs) == 1 else {
      "machine": " / ".join(sorted({json.loads(e)["machine"] for e in envs}))}
  seeds, steps = [], []
  for bench, s in summary.items():
    counts = sorted({r["seeds"] for r in s["rows"].values()})
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    seeds.append(f"{bench} {span} per method")
    steps.append(f"{bench} {s['steps']}")
  return grid.stamp(env, command, "; ".join(seeds), ", ".join(steps),
                    "Bars: Δm% mean and 95% t-interval with the baselines' seed noise (delta "
                    "method); grey band: the single-task runs' own 95% interval.")


TASK_METHODS = ("none", "vanilla", "tbgc_star", "tbgc", "backbone_clip", "fairgrad", "nash_mtl",
                "mgda", "famo")


def task_changes(summary: Mapping[str, Any], bench: str, methods: Sequence[str]) -> str:
  """Per task, the relative change (%) of a method's mean metric against the single-task mean."""
  rows = summary[bench]["rows"]
  if "single" not in rows:
    return ""
  base = {t: iv.mean for t, iv in rows["single"]["tasks"].items()}
  lines = ["| method | " + " | ".join(base) + " |", "|---|" + "---|" * len(base)]
  for m in methods:
    if m in rows:
      cells = [f"{100 * (rows[m]['tasks'][t].mean - b) / b:+.1f}" for t, b in base.items()]
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def runs_table(records: Sequence[Mapping[str, Any]]) -> str:
  """What the results file holds: runs, seeds and wall time per benchmark."""
  lines = ["| benchmark | steps | runs | methods | seeds per method | single-task runs | "
           "wall time, h | median s per run |", "|---|---|---|---|---|---|---|---|"]
  for bench in sorted({r["benchmark"] for r in records}):
    recs = [r for r in records if r["benchmark"] == bench]
    methods = {r["method"] for r in recs} - {"single"}
    seeds = sorted({sum(r["method"] == m for r in recs) for m in methods})
    span = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    secs = [r["seconds"] for r in recs]
    steps = sorted({r["steps"] for r in recs})
    lines.append(f"| {bench} | {', '.join(map(str, steps))} | {len(recs)} | {len(methods)} | "
                 f"{span} | {sum(r['method'] == 'single' for r in recs)} | "
                 f"{sum(secs) / 3600:.2f} | {float(np.median(secs)):.1f} |")
  return "\n".join(lines) + "\n"


def doc_blocks(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
               ) -> dict[str, str]:
  """The generated blocks of docs/comparison.md and README.md."""
  blocks = {f"compare {b}": benchmark_markdown(b, s) for b, s in summary.items() if s["rows"]}
  blocks.update({f"compare {b} tasks": task_changes(summary, b, TASK_METHODS)
                 for b, s in summary.items() if s["rows"]})
  blocks["compare runs"] = runs_table(records)
  blocks["compare readme"] = readme_table(summary, README_METHODS)
  return blocks


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
  p_rep.add_argument("--plot", default="", help="figure path; its stamp also goes to <plot>.txt")
  p_rep.add_argument("--command", default="",
                     help="command printed on the plot (default: this one, as typed)")
  p_rep.add_argument("--docs", default="",
                     help="comma-separated markdown files whose generated blocks "
                          "(<!-- begin: compare ... -->) are rewritten")
  args = parser.parse_args(argv)

  if args.command == "run":
    methods = None if args.methods == "all" else args.methods.split(",")
    run_grid(args.out, args.benchmarks.split(","), methods,
             [int(s) for s in args.seeds.split(",")], args.steps, args.lr)
    return
  records = grid.read_results(args.results)
  summary = summarize(records, _higher_better())
  print(markdown(summary))
  if args.plot:
    caption = figure_stamp(records, summary,
                           args.command or grid.command_line("benchmarks.compare", argv))
    plot(summary, args.plot, caption)
    grid.write_stamp(args.plot, caption)
  for doc in filter(None, args.docs.split(",")):
    grid.update_blocks(doc, doc_blocks(records, summary))


if __name__ == "__main__":
  main()
