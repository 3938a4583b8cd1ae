"""Reproduces the paper's ablations: Table 2 (gradient methods), Table 3 (augmentation), Figure 1.

  python -m benchmarks.reproduce --config configs/tiny.py --seeds 3 --workdir runs/ablation

Runs train + eval for every (gradient method, augmentation mode, seed) of the grid, each in its
own process (``<workdir>/runs/<method>-<augment>-s<seed>``) with one persistent compilation
cache shared by all runs, and appends one row per finished run to ``<workdir>/results.jsonl``.
A run already in the results file is skipped, and an interrupted run resumes from its own
latest checkpoint, so the command can be re-run after a crash. Then it writes
``<workdir>/report.md`` (one table per ablation: mean and 95% interval per task and overall,
and the paired difference of each method against ``vanilla``), and ``<workdir>/figure1.png``
(per-task backbone gradient norm over training: raw under vanilla, and after each method).

Grids:
- ``paper`` (default): Table 2 is every ``--methods`` entry under ``plain`` augmentation (the
  paper's setting for it); Table 3 is ``parallel`` vs ``multi_branch`` under ``tbgc``.
- ``full``: every method x every ``--augment_modes`` entry.

Any ``--config.<field>=<value>`` flag is passed to every run (e.g. a shorter schedule); any
registered gradient method may be named in ``--methods``. ``--report_only`` rewrites the
report from the results file. Runs unchanged on a GPU: each run is ``train_and_evaluate``.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from tbgc_jax.data.augment import AUGMENT_MODES
from tbgc_jax.tasks import metric_key, task_names

PAPER_METHODS = ("none", "vanilla", "tbgc_star", "tbgc")
BASELINE = "vanilla"


@dataclasses.dataclass(frozen=True)
class Run:
  """One cell of the grid."""

  method: str
  augment_mode: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.method}-{self.augment_mode}-s{self.seed}"


def make_grid(methods: Sequence[str], augment_modes: Sequence[str], seeds: int,
              grid: str = "paper") -> list[Run]:
  """The runs of an ablation grid, seeds innermost-last so every cell gets seed 0 first.

  Args:
    methods: gradient methods (Table 2's rows).
    augment_modes: augmentation modes for the ``full`` grid.
    seeds: number of seeds, 0 .. seeds - 1.
    grid: ``paper`` (methods under plain; parallel vs multi_branch under tbgc) or ``full``.

  Returns:
    Distinct runs in execution order.
  """
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  if grid == "paper":
    cells = [(m, "plain") for m in methods] + [("tbgc", a) for a in ("parallel", "multi_branch")]
  elif grid == "full":
    cells = [(m, a) for a in augment_modes for m in methods]
  else:
    raise ValueError(f"--grid must be 'paper' or 'full', got {grid!r}")
  runs, seen = [], set()
  for seed in range(seeds):
    for method, augment in cells:
      run = Run(method, augment, seed)
      if run not in seen:
        seen.add(run)
        runs.append(run)
  return runs


def read_results(path: str) -> list[dict]:
  """Rows of a results file; a torn last line (a crash mid-write) is ignored."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def _append(path: str, row: Mapping) -> None:
  """Appends one row on a line of its own (after a torn last line, on the next line)."""
  torn = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
  with open(path, "a") as f:
    f.write(("\n" if torn else "") + json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def subprocess_runner(config: str, overrides: Sequence[str], cache_dir: str
                      ) -> Callable[[Run, str], dict]:
  """Runs one grid cell as ``python -m benchmarks.reproduce --train_only ...`` in a new process.

  Returns:
    ``runner(run, run_dir) -> eval metrics`` (raises ``RuntimeError`` on a failed run).
  """

  def runner(run: Run, run_dir: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.reproduce", "--train_only", f"--config={config}",
           f"--workdir={run_dir}", *overrides, f"--config.grad.method={run.method}",
           f"--config.augment_mode={run.augment_mode}", f"--config.seed={run.seed}"]
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
      raise RuntimeError(f"run {run.name} failed (exit {proc.returncode}): {' '.join(cmd)}")
    with open(os.path.join(run_dir, "eval_metrics.json")) as f:
      return json.load(f)

  return runner


def run_grid(runs: Iterable[Run], workdir: str, runner: Callable[[Run, str], dict], *,
             config_name: str = "", log: Callable[[str], None] = print) -> list[dict]:
  """Runs every run not yet in ``<workdir>/results.jsonl`` and appends its row.

  A failed run is logged and left out (re-running the command retries it); the others go on.

  Returns:
    All rows of the results file.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.jsonl")
  done = {r["run"] for r in read_results(path)}
  runs = list(runs)
  for i, run in enumerate(runs):
    if run.name in done:
      log(f"[{i + 1}/{len(runs)}] {run.name}: done already")
      continue
    log(f"[{i + 1}/{len(runs)}] {run.name}: training")
    run_dir = os.path.join(workdir, "runs", run.name)
    t0 = time.perf_counter()
    try:
      metrics = runner(run, run_dir)
    except RuntimeError as e:
      log(f"[{i + 1}/{len(runs)}] {run.name}: FAILED ({e}); re-run the command to retry")
      continue
    wall = time.perf_counter() - t0
    row = {"run": run.name, "config": config_name, "method": run.method,
           "augment_mode": run.augment_mode, "seed": run.seed, "wall_s": round(wall, 1),
           "step": metrics.get("step"),
           "metrics": {k: v for k, v in metrics.items() if k != "step"}}
    _append(path, row)
    log(f"[{i + 1}/{len(runs)}] {run.name}: score "
        f"{100 * metrics.get('score', float('nan')):.2f} in {wall / 60:.1f} min")
  return read_results(path)


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """Mean and half-width of the two-sided Student-t interval (nan half-width for n < 2)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  if x.size < 2:
    return float(x.mean()), math.nan
  from scipy import stats

  half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
  return float(x.mean()), float(half)


def _fmt(mean: float, half: float) -> str:
  if math.isnan(mean):
    return "-"
  return f"{mean:.2f}" if math.isnan(half) else f"{mean:.2f} ± {half:.2f}"


def _columns(rows: Sequence[dict]) -> list[tuple[str, str]]:
  """(header, metric key) for the tasks present, then the overall score."""
  keys = {k for r in rows for k in r["metrics"]}
  cols = [(t, metric_key(t)) for t in task_names() if metric_key(t) in keys]
  return cols + [("overall", "score")]


def ablation_table(rows: Sequence[dict], cells: Sequence[tuple[str, str]], label: str,
                   baseline: tuple[str, str] | None) -> tuple[str, dict]:
  """A markdown table: per cell, mean ± 95% interval over seeds; paired differences to baseline.

  Args:
    rows: result rows.
    cells: ``(method, augment_mode)`` rows of the table, in order.
    label: which of the two the table varies (``method`` or ``augment_mode``).
    baseline: the cell the paired differences are taken against (None: no difference rows).

  Returns:
    ``(markdown, summary)``; ``summary[cell]`` holds per column ``(mean, half-width)``, and
    ``summary[("diff", cell)]`` the paired differences and their seed count.
  """
  by_cell: dict[tuple[str, str], dict[int, dict]] = {}
  for r in rows:
    by_cell.setdefault((r["method"], r["augment_mode"]), {})[r["seed"]] = r["metrics"]
  present = [c for c in cells if c in by_cell]
  cols = _columns([r for r in rows if (r["method"], r["augment_mode"]) in set(present)])
  header = [label, "seeds", *(h for h, _ in cols)]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  summary: dict = {}
  for cell in present:
    seeds = by_cell[cell]
    stats_ = {h: interval([m[k] for m in seeds.values() if k in m]) for h, k in cols}
    summary[cell] = stats_
    name = cell[0] if label == "method" else cell[1]
    lines.append("| " + " | ".join([name, str(len(seeds)), *(_fmt(*stats_[h]) for h, _ in cols)])
                 + " |")
  if baseline is not None and baseline in by_cell:
    base = by_cell[baseline]
    diff_lines = []
    for cell in present:
      if cell == baseline:
        continue
      common = sorted(set(by_cell[cell]) & set(base))
      if not common:
        continue
      stats_ = {h: interval([by_cell[cell][s][k] - base[s][k] for s in common
                             if k in by_cell[cell][s] and k in base[s]]) for h, k in cols}
      summary[("diff", cell)] = {**stats_, "n": len(common)}
      name = cell[0] if label == "method" else cell[1]
      diff_lines.append("| " + " | ".join(
          [f"{name} − {baseline[0] if label == 'method' else baseline[1]}", str(len(common)),
           *(_fmt(*stats_[h]) for h, _ in cols)]) + " |")
    if diff_lines:
      lines += ["", "Paired difference (same seed):", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header), *diff_lines]
  return "\n".join(lines), summary


def ordering_verdict(summary: Mapping, order: Sequence[tuple[str, str]],
                     names: Sequence[str]) -> str:
  """Says whether the overall score follows ``order`` (ascending) and whether intervals separate.

  The paired differences are against the table's baseline; a difference "separates" when its
  95% interval excludes 0.
  """
  means = [summary[c]["overall"][0] if c in summary else math.nan for c in order]
  if any(math.isnan(m) for m in means):
    return "Not all runs of " + " < ".join(names) + " are in yet."
  holds = all(a < b for a, b in zip(means, means[1:], strict=False))
  text = (" < ".join(names) + (" holds" if holds else " does not hold") + " on the overall score ("
          + ", ".join(f"{n} {m:.2f}" for n, m in zip(names, means, strict=True)) + ").")
  seps = []
  for c, n in zip(order, names, strict=True):
    d = summary.get(("diff", c))
    if d is None:
      continue
    mean, half = d["overall"]
    if math.isnan(half):
      seps.append(f"{n}: {mean:+.2f} (one seed, no interval)")
    else:
      verdict = "interval excludes 0" if abs(mean) > half else "interval includes 0"
      seps.append(f"{n}: {mean:+.2f} ± {half:.2f} over {d['n']} seeds ({verdict})")
  if seps:
    text += " Paired differences: " + "; ".join(seps) + "."
  return text


def figure1(workdir: str, rows: Sequence[dict], path: str,
            tasks: Sequence[str] | None = None) -> str | None:
  """Figure 1: per-task backbone gradient norm over training, raw under vanilla, then after each
  method (seed 0, ``plain`` augmentation where present). Returns the path, or None if no run has
  per-task norms logged. ``tasks``: default every registered task."""
  from tbgc_jax.trainer import logs

  tasks = task_names() if tasks is None else tasks

  panels = []  # (title, jsonl, key suffix)
  by = {(r["method"], r["augment_mode"], r["seed"]): r for r in rows}
  methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
  for m in methods:
    aug = "plain" if (m, "plain", 0) in by else next(
        (a for a in AUGMENT_MODES if (m, a, 0) in by), None)
    if aug is None:
      continue
    jsonl = os.path.join(workdir, "runs", Run(m, aug, 0).name, "metrics.jsonl")
    if not os.path.exists(jsonl):
      continue
    if m == BASELINE:
      panels.insert(0, (f"raw (under {m})", jsonl, "backbone_grad_norm"))
    panels.append((f"after {m}", jsonl, "backbone_grad_norm_after"))
  if not panels:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True,
                           squeeze=False)
  for ax, (title, jsonl, suffix) in zip(axes[0], panels, strict=True):
    data = logs.read_jsonl(jsonl)
    steps = np.array([r["step"] for r in data])
    for t in tasks:
      y = np.array([r.get(f"{t}/{suffix}", np.nan) for r in data], np.float64)
      if np.isfinite(y).any():
        ax.plot(steps, y, label=t, lw=1)
    ax.set(title=title, xlabel="step", yscale="log")
  axes[0][0].set_ylabel("backbone gradient norm")
  axes[0][0].legend()
  fig.suptitle("Per-task backbone gradient norm (Figure 1)", y=1.03)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def write_report(workdir: str, rows: Sequence[dict], methods: Sequence[str]) -> str:
  """Writes ``report.md`` (both ablation tables, verdicts, machine) and ``figure1.png``."""
  import jax

  wall = sum(r.get("wall_s", 0.0) for r in rows)
  # The headline metrics and the score are fractions; the tables show them in percent.
  keys = [k for _, k in _columns(rows)]
  rows = [dict(r, metrics={k: 100 * v if k in keys else v for k, v in r["metrics"].items()})
          for r in rows]
  parts = [
      "# Ablations",
      "",
      f"{len(rows)} runs, {wall / 3600:.2f} h of train + eval in total; "
      f"jax {jax.__version__}, device: {jax.devices()[0].device_kind}, "
      f"config: {rows[0]['config'] if rows else '-'}. Entries: mean ± 95% t-interval over seeds, "
      "in percent.",
      "",
      "## Table 2: gradient methods (plain augmentation)",
      "",
  ]
  t2_cells = [(m, "plain") for m in methods]
  table, summary = ablation_table(rows, t2_cells, "method", (BASELINE, "plain"))
  parts += [table, "", ordering_verdict(
      summary, [("vanilla", "plain"), ("tbgc_star", "plain"), ("tbgc", "plain")],
      ["vanilla", "TBGC*", "TBGC"]), ""]
  t3_cells = [("tbgc", "parallel"), ("tbgc", "multi_branch")]
  table, summary = ablation_table(rows, t3_cells, "augment_mode", ("tbgc", "parallel"))
  parts += ["## Table 3: augmentation (TBGC)", "", table, "",
            ordering_verdict(summary, t3_cells, ["parallel", "multi-branch"]), ""]
  fig = figure1(workdir, rows, os.path.join(workdir, "figure1.png"))
  if fig:
    parts += ["## Figure 1", "", "![per-task backbone gradient norm](figure1.png)", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags
  from ml_collections import config_flags

  cfg = _FLAGS
  config_flag = flags.FLAGS["config"]
  overrides = [f"--config.{k}={v}"
               for k, v in config_flags.get_override_values(config_flag).items()]
  if cfg.train_only.value:
    from tbgc_jax.trainer.setup import use_compilation_cache
    from tbgc_jax.trainer.train import train_and_evaluate

    use_compilation_cache(cfg.workdir.value)
    train_and_evaluate(cfg.config.value, cfg.workdir.value)
    return
  methods = [m for m in cfg.methods.value.split(",") if m]
  modes = [a for a in cfg.augment_modes.value.split(",") if a]
  workdir = cfg.workdir.value
  if not cfg.report_only.value:
    runs = make_grid(methods, modes, cfg.seeds.value, cfg.grid.value)
    config_arg = config_flags.get_config_filename(config_flag)
    runner = subprocess_runner(config_arg, overrides, os.path.join(workdir, "jax_cache"))
    run_grid(runs, workdir, runner, config_name=" ".join([config_arg, *overrides]))
  rows = read_results(os.path.join(workdir, "results.jsonl"))
  print(f"report: {write_report(workdir, rows, methods)}")


class _Flags:
  """absl flags, defined on first use so importing this module defines none."""

  def __init__(self):
    from absl import flags
    from ml_collections import config_flags

    self.config = config_flags.DEFINE_config_file("config", None, "Trainer config file.",
                                                  lock_config=True)
    self.workdir = flags.DEFINE_string("workdir", None, "Results, runs and the report go here.")
    self.seeds = flags.DEFINE_integer("seeds", 3, "Seeds per cell (0 .. seeds - 1).")
    self.methods = flags.DEFINE_string("methods", ",".join(PAPER_METHODS),
                                       "Comma-separated gradient methods (any registered name).")
    self.augment_modes = flags.DEFINE_string("augment_modes", ",".join(AUGMENT_MODES),
                                             "Augmentation modes for --grid=full.")
    self.grid = flags.DEFINE_enum("grid", "paper", ["paper", "full"], "Which cells to run.")
    self.report_only = flags.DEFINE_bool("report_only", False, "Only rewrite the report.")
    self.train_only = flags.DEFINE_bool("train_only", False,
                                        "Internal: train + eval one run in --workdir.")
    flags.mark_flags_as_required(["config", "workdir"])


_FLAGS: _Flags


if __name__ == "__main__":
  from absl import app

  _FLAGS = _Flags()
  app.run(main)
