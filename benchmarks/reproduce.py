"""Reproduces the paper's ablations: Table 2 (gradient methods), Table 3 (augmentation), Figure 1.

  python -m benchmarks.reproduce --config configs/tiny.py --seeds 3 --workdir runs/ablation

Runs train + eval for every (gradient method, augmentation mode, seed) of the grid, each in its
own process (``<workdir>/runs/<method>-<augment>-s<seed>``) with one persistent compilation
cache shared by all runs, and appends one row per finished run to ``<workdir>/results.jsonl``.
A run already in the results file is skipped, and an interrupted run resumes from its own
latest checkpoint, so the command can be re-run after a crash. Then it writes
``<workdir>/report.md`` (one table per ablation: mean and 95% interval per task and overall;
seed-paired differences against ``vanilla`` and along the paper's orderings, Holm-corrected,
with a verdict per ordering; `benchmarks.stats`), ``<workdir>/grad_norms.jsonl`` (every run's
per-task backbone gradient norms) and ``<workdir>/figure1.png`` with its stamp
``figure1.txt`` (per-task backbone gradient norm over training, median and range over seeds:
raw under vanilla, and after each method). ``--docs`` rewrites the generated tables of the
named markdown files.

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

from benchmarks import grid, stats
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


def subprocess_runner(config: str, overrides: Sequence[str], cache_dir: str,
                      hparams: Mapping | None = None) -> Callable[[Run, str], dict]:
  """Runs one grid cell as ``python -m benchmarks.reproduce --train_only ...`` in a new process.

  Each method gets those of ``hparams`` (the config's ``grad.hparams``) that it takes, as its
  ``--config.grad.hparams``: the grid's methods share ``max_norm`` where they have one.

  Returns:
    ``runner(run, run_dir) -> eval metrics`` (raises ``RuntimeError`` on a failed run).
  """

  def method_hparams(method: str) -> dict:
    import tbgc_jax

    takes = tbgc_jax.get_method(method).hyperparameters
    return {k: v for k, v in dict(hparams or {}).items() if k in takes}

  def runner(run: Run, run_dir: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.reproduce", "--train_only", f"--config={config}",
           f"--workdir={run_dir}", *overrides, f"--config.grad.method={run.method}",
           f"--config.grad.hparams={method_hparams(run.method)!r}",
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

  A failed run (``RuntimeError``) is logged and left out (re-running the command retries it);
  the others go on.

  Returns:
    All rows of the results file.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.jsonl")

  def run(job: dict) -> dict:
    r = Run(job["method"], job["augment_mode"], job["seed"])
    t0 = time.perf_counter()
    metrics = runner(r, os.path.join(workdir, "runs", r.name))
    return {**job, "config": config_name, "wall_s": round(time.perf_counter() - t0, 1),
            "step": metrics.get("step"),
            "metrics": {k: v for k, v in metrics.items() if k != "step"}}

  jobs = [{"run": r.name, "method": r.method, "augment_mode": r.augment_mode, "seed": r.seed}
          for r in runs]
  grid.run_grid(jobs, path, run, key=lambda r: r["run"], label=lambda j: j["run"],
                describe=lambda r: (f"score {100 * r['metrics'].get('score', math.nan):.2f} "
                                    f"in {r['wall_s'] / 60:.1f} min"),
                retry_later=(RuntimeError,), log=log)
  return grid.read_results(path)


def _columns(rows: Sequence[dict]) -> list[tuple[str, str]]:
  """(header, metric key) for the tasks present, then the overall score."""
  keys = {k for r in rows for k in r["metrics"]}
  cols = [(t, metric_key(t)) for t in task_names() if metric_key(t) in keys]
  return cols + [("overall", "score")]


def _name(cell: tuple[str, str], label: str) -> str:
  return cell[0] if label == "method" else cell[1]


def ablation_table(rows: Sequence[dict], cells: Sequence[tuple[str, str]], label: str,
                   pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]] = ()
                   ) -> tuple[str, dict]:
  """A markdown table of means over seeds and one of seed-paired differences, Holm-corrected.

  Args:
    rows: result rows.
    cells: ``(method, augment_mode)`` rows of the table, in order.
    label: which of the two the table varies (``method`` or ``augment_mode``).
    pairs: ``(a, b)`` cells whose paired difference ``a - b`` is tested, in every column;
      pairs with a missing cell are left out. Their p-values are one Holm family.

  Returns:
    ``(markdown, summary)``; ``summary[cell]`` holds per column a `stats.Interval`, and
    ``summary[("diff", a, b)]`` per column ``(stats.Paired, Holm-adjusted p)``;
    ``summary["family"]`` is the number of tests corrected together.
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
    summary[cell] = {h: stats.t_interval([m[k] for m in seeds.values() if k in m])
                     for h, k in cols}
    lines.append("| " + " | ".join([_name(cell, label), str(len(seeds)),
                                    *(stats.fmt_interval(*summary[cell][h][:2]) for h, _ in cols)])
                 + " |")
  pairs = [(a, b) for a, b in pairs if a in by_cell and b in by_cell and a in present
           and b in present]
  tests = {(a, b, h): stats.paired({s: m[k] for s, m in by_cell[a].items() if k in m},
                                   {s: m[k] for s, m in by_cell[b].items() if k in m})
           for a, b in pairs for h, k in cols}
  adjusted = dict(zip(tests, stats.holm([d.p for d in tests.values()]), strict=True))
  summary["family"] = len(tests)
  if pairs:
    lines += ["", f"Paired by seed, a − b: mean ± 95% t-interval, seeds above / below 0, p of "
              f"the paired t-test Holm-corrected over the {len(tests)} tests of this table "
              f"({len(pairs)} pair{'s' if len(pairs) > 1 else ''} x {len(cols)} columns).", "",
              "| " + " | ".join(["a − b", "seeds", *(h for h, _ in cols)]) + " |",
              "|" + "---|" * len(header)]
    for a, b in pairs:
      summary[("diff", a, b)] = {h: (tests[a, b, h], float(adjusted[a, b, h])) for h, _ in cols}
      cells_ = [f"{stats.fmt_interval(d.mean, d.half, signed=True)}, {stats.fmt_signs(d)}, "
                f"p {stats.fmt_p(p)}" for d, p in summary[("diff", a, b)].values()]
      lines.append("| " + " | ".join([f"{_name(a, label)} − {_name(b, label)}",
                                      str(tests[a, b, cols[0][0]].n), *cells_]) + " |")
    same, n_seeds = _same_sign(tests.values())
    if n_seeds:
      lines += ["", f"{same} of the {len(tests)} paired comparisons have every seed on one "
                f"side; with {n_seeds} seeds and no effect at all, "
                f"{stats.all_same_sign_expected(len(tests), n_seeds):.1f} would (each has "
                f"probability {2.0 ** (1 - n_seeds):.2f}: the sign test's smallest p-value)."]
  return "\n".join(lines), summary


def _same_sign(diffs: Iterable[stats.Paired]) -> tuple[int, int]:
  """(how many have every seed on one side, seed count if it is the same for all, else 0)."""
  diffs = list(diffs)
  ns = {d.n for d in diffs}
  same = sum(d.n > 0 and (d.positive == d.n or d.negative == d.n) for d in diffs)
  return same, (ns.pop() if len(ns) == 1 else 0)


def ordering_verdict(summary: Mapping, order: Sequence[tuple[str, str]],
                     names: Sequence[str]) -> str:
  """Whether the overall score follows ``order`` (ascending): on the means, and for each step
  of the chain as a seed-paired difference, Holm-corrected within its table."""
  means = [summary[c]["overall"].mean if c in summary else math.nan for c in order]
  if any(math.isnan(m) for m in means):
    return "Not all runs of " + " < ".join(names) + " are in yet."
  chain = " < ".join(names)
  ordered = all(a < b for a, b in zip(means, means[1:], strict=False))
  listed = ", ".join(f"{n} {m:.2f}" for n, m in zip(names, means, strict=True))
  text = (f"{chain}: the mean overall scores ({listed}) "
          + ("are in this order" if ordered else "are not in this order") + ".")
  steps, supported = [], True
  for (lo, hi), (nlo, nhi) in zip(zip(order, order[1:], strict=False),
                                  zip(names, names[1:], strict=False), strict=True):
    d = summary.get(("diff", hi, lo))
    if d is None:
      supported = False
      continue
    diff, p = d["overall"]
    if diff.n < 2:
      steps.append(f"{nhi} − {nlo} {diff.mean:+.2f} (one seed, no interval)")
      supported = False
      continue
    ok = diff.mean > 0 and p < stats.ALPHA
    supported &= ok
    steps.append(f"{nhi} − {nlo} {stats.fmt_interval(diff.mean, diff.half, signed=True)} "
                 f"({stats.fmt_signs(diff)} seeds above/below 0, Holm p {stats.fmt_p(p)})")
  if steps:
    text += " Paired by seed: " + "; ".join(steps) + ". "
    text += (f"Each step is a significant increase at {stats.ALPHA:g} after Holm's correction: "
             "the ordering holds." if supported else
             f"Not established: not every step is a significant increase at {stats.ALPHA:g} "
             "after Holm's correction.")
  return text


# ------------------------------------------------------------------ Figure 1
NORM_KEYS = ("backbone_grad_norm", "backbone_grad_norm_after")


def collect_grad_norms(workdir: str, rows: Sequence[dict]) -> str | None:
  """Copies every run's per-task backbone gradient norms (raw and after the method) from its
  training log into ``<workdir>/grad_norms.jsonl``, one line per run: the small file Figure 1
  is drawn from, kept beside the results. Runs without a log keep their earlier line.

  Returns:
    The file's path, or None when no run has norms.
  """
  from tbgc_jax.trainer import logs

  path = os.path.join(workdir, "grad_norms.jsonl")
  old = {r["run"]: r for r in grid.read_results(path)}
  out = dict(old)
  for row in rows:
    jsonl = os.path.join(workdir, "runs", row["run"], "metrics.jsonl")
    if not os.path.exists(jsonl):
      continue
    data = [r for r in logs.read_jsonl(jsonl) if "step" in r]
    series = {f"{t}/{k}": [r.get(f"{t}/{k}") for r in data] for t in task_names()
              for k in NORM_KEYS if any(f"{t}/{k}" in r for r in data)}
    if series:
      out[row["run"]] = {"run": row["run"], "method": row["method"],
                         "augment_mode": row["augment_mode"], "seed": row["seed"],
                         "step": [r["step"] for r in data], **series}
  if not out:
    return None
  if out != old:
    with open(path, "w") as f:
      for rec in out.values():
        f.write(json.dumps(rec) + "\n")
  return path


def _band(runs: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray] | None:
  """(steps, median, min, max) over runs of one series, on the steps every run logged."""
  runs = [r for r in runs if key in r]
  if not runs:
    return None
  steps = sorted(set.intersection(*(set(r["step"]) for r in runs)))
  y = np.array([[dict(zip(r["step"], r[key], strict=True)).get(s) for s in steps] for r in runs],
               np.float64)
  return np.array(steps), np.nanmedian(y, 0), np.nanmin(y, 0), np.nanmax(y, 0)


def figure1(norms: Sequence[dict], path: str, caption: str,
            tasks: Sequence[str] | None = None) -> str | None:
  """Figure 1: per-task backbone gradient norm over training, raw under vanilla, then after
  each method: median over the seeds, band from the lowest to the highest seed (``plain``
  augmentation where present).

  Args:
    norms: lines of ``grad_norms.jsonl`` (`collect_grad_norms`).
    path: the figure's path.
    caption: the stamp drawn into the figure.
    tasks: default every registered task.

  Returns:
    ``path``, or None when no run has norms.
  """
  tasks = task_names() if tasks is None else tasks
  panels = []  # (title, runs, key suffix)
  methods = list(dict.fromkeys(r["method"] for r in norms if r["method"] != "none"))
  for m in methods:
    aug = next((a for a in ("plain", *AUGMENT_MODES)
                if any(r["method"] == m and r["augment_mode"] == a for r in norms)), None)
    runs = [r for r in norms if r["method"] == m and r["augment_mode"] == aug]
    if m == BASELINE:
      panels.insert(0, (f"raw (under {m})", runs, NORM_KEYS[0]))
    panels.append((f"after {m}", runs, NORM_KEYS[1]))
  if not panels:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), sharey=True,
                           squeeze=False)
  for ax, (title, runs, suffix) in zip(axes[0], panels, strict=True):
    for i, t in enumerate(tasks):
      band = _band(runs, f"{t}/{suffix}")
      if band is None or not np.isfinite(band[1]).any():
        continue
      steps, med, lo, hi = band
      ax.plot(steps, med, label=t, lw=1, color=f"C{i}")
      ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.25, lw=0)
    ax.set(title=f"{title} ({len(runs)} seeds)", xlabel="step", yscale="log")
  axes[0][0].set_ylabel("backbone gradient norm")
  axes[0][0].legend()
  fig.suptitle("Per-task backbone gradient norm (Figure 1): median over seeds, band = range")
  grid.draw_stamp(fig, caption, width=40 * len(panels))
  fig.tight_layout(rect=(0, 0.13, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def norm_medians(norms: Sequence[dict], method: str = BASELINE,
                 windows: Sequence[tuple[int, int | None]] = ((0, 100), (200, None)),
                 tasks: Sequence[str] | None = None) -> str:
  """A markdown table: per step window and task, the median raw backbone gradient norm of each
  seed under ``method`` (plain augmentation), seeds separated by ``/``."""
  tasks = task_names() if tasks is None else tasks
  runs = sorted((r for r in norms if r["method"] == method and r["augment_mode"] == "plain"),
                key=lambda r: r["seed"])
  if not runs:
    return ""
  lines = ["| steps | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
  for lo, hi in windows:
    cells = []
    for t in tasks:
      vals = []
      for r in runs:
        y = [v for s, v in zip(r["step"], r.get(f"{t}/{NORM_KEYS[0]}", []), strict=False)
             if s >= lo and (hi is None or s <= hi) and v is not None]
        vals.append(f"{np.median(y):.1f}" if y else "-")
      cells.append(" / ".join(vals))
    end = "end" if hi is None else f"{hi:,}"
    lines.append(f"| {lo:,}–{end} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def in_percent(rows: Sequence[dict]) -> list[dict]:
  """The rows with the headline metrics and the score (fractions, as train.py reports them)
  in percent, as the tables show them."""
  keys = [k for _, k in _columns(rows)]
  return [dict(r, metrics={k: 100 * v if k in keys else v for k, v in r["metrics"].items()})
          for r in rows]


def write_report(workdir: str, rows: Sequence[dict], methods: Sequence[str],
                 command: str = "") -> str:
  """Writes ``report.md`` (both ablation tables, verdicts, machine) and ``figure1.png`` (with
  its stamp beside it, ``figure1.txt``)."""
  wall = sum(r.get("wall_s", 0.0) for r in rows)
  rows = in_percent(rows)
  env = grid.environment()
  steps = sorted({r.get("step") for r in rows if r.get("step") is not None})
  blocks = report_blocks(rows, methods)
  blocks = {k: v for k, v in blocks.items() if not k.endswith("readme")}
  parts = [
      "# Ablations",
      "",
      f"{len(rows)} runs, {wall / 3600:.2f} h of train + eval in total; "
      f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}, {env['machine']}; "
      f"config: {rows[0]['config'] if rows else '-'}. Entries: mean ± 95% t-interval over seeds, "
      "in percent.",
      "",
      "## Table 2: gradient methods (plain augmentation)",
      "",
      blocks["ablation table2"],
      "## Table 3: augmentation (TBGC)",
      "",
      blocks["ablation table3"],
  ]
  path = os.path.join(workdir, "figure1.png")
  norms_path = collect_grad_norms(workdir, rows)
  norms = grid.read_results(norms_path) if norms_path else []
  caption = grid.stamp(
      env, command or "python -m benchmarks.reproduce " + (rows[0]["config"] if rows else ""),
      ", ".join(map(str, sorted({r["seed"] for r in norms}))) or "-",
      ", ".join(map(str, steps)) or "-")
  if figure1(norms, path, caption):
    grid.write_stamp(path, caption)
    parts += ["## Figure 1", "", "![per-task backbone gradient norm](figure1.png)", "",
              caption, "", "Median raw backbone gradient norm under vanilla, per seed:", "",
              norm_medians(norms)]
  out = os.path.join(workdir, "report.md")
  with open(out, "w") as f:
    f.write("\n".join(parts))
  return out


def report_blocks(rows: Sequence[dict], methods: Sequence[str], prefix: str = "ablation",
                  norms: Sequence[dict] = ()) -> dict[str, str]:
  """The generated blocks of the report and of docs/ablations.md: both tables with verdicts.

  ``rows`` in percent. Table 2 has ``methods``, then any other method run under ``plain``; it
  tests every method against ``vanilla`` and each step of the paper's chain
  (``tbgc - tbgc_star``, and ``backbone_clip - tbgc`` where run); Table 3
  ``multi_branch - parallel``. With ``norms`` (lines of ``grad_norms.jsonl``), also Figure 1's
  table of median raw backbone gradient norms under vanilla.
  """
  methods = [*methods, *sorted({r["method"] for r in rows if r["augment_mode"] == "plain"}
                               - set(methods))]
  t2 = [(m, "plain") for m in methods]
  pairs = [((m, "plain"), (BASELINE, "plain")) for m in methods if m != BASELINE]
  pairs += [(("tbgc", "plain"), ("tbgc_star", "plain")),
            (("backbone_clip", "plain"), ("tbgc", "plain"))]
  table2, s2 = ablation_table(rows, t2, "method", pairs)
  v2 = ordering_verdict(s2, [("vanilla", "plain"), ("tbgc_star", "plain"), ("tbgc", "plain")],
                        ["vanilla", "TBGC*", "TBGC"])
  t3 = [("tbgc", "parallel"), ("tbgc", "multi_branch")]
  table3, s3 = ablation_table(rows, t3, "augment_mode", [(t3[1], t3[0])])
  v3 = ordering_verdict(s3, t3, ["parallel", "multi-branch"])
  blocks = {f"{prefix} table2": f"{table2}\n\n{v2}\n", f"{prefix} table3": f"{table3}\n\n{v3}\n",
            f"{prefix} readme": _overview(s2, methods)}
  if norms:
    blocks[f"{prefix} norms"] = norm_medians(norms)
  return blocks


def _overview(s2: Mapping, methods: Sequence[str]) -> str:
  """README's view of Table 2: overall score per method and its paired difference to vanilla."""
  present = [m for m in methods if (m, "plain") in s2]
  lines = ["| | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
  n = {s2[(m, "plain")]["overall"].n for m in present}
  lines.append(f"| overall, mean ± 95% t-interval ({'/'.join(map(str, sorted(n)))} seeds) | "
               + " | ".join(stats.fmt_interval(*s2[(m, "plain")]["overall"][:2]) for m in present)
               + " |")
  cells = []
  for m in present:
    d = s2.get(("diff", (m, "plain"), (BASELINE, "plain")))
    if d is None:
      cells.append("-")
      continue
    diff, p = d["overall"]
    cells.append(f"{stats.fmt_interval(diff.mean, diff.half, signed=True)} "
                 f"({stats.fmt_signs(diff)}, Holm p {stats.fmt_p(p)})")
  lines.append(f"| − {BASELINE}, paired by seed (above/below 0) | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


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
    runner = subprocess_runner(config_arg, overrides, os.path.join(workdir, "jax_cache"),
                               dict(cfg.config.value.grad.get("hparams", None) or {}))
    run_grid(runs, workdir, runner, config_name=" ".join([config_arg, *overrides]))
  rows = grid.read_results(os.path.join(workdir, "results.jsonl"))
  command = grid.command_line("benchmarks.reproduce", list(sys.argv[1:]))
  print(f"report: {write_report(workdir, rows, methods, command)}")
  norms = grid.read_results(os.path.join(workdir, "grad_norms.jsonl"))
  blocks = report_blocks(in_percent(rows), methods, cfg.docs_prefix.value, norms)
  for doc in filter(None, cfg.docs.value.split(",")):
    grid.update_blocks(doc, blocks)


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
    self.docs = flags.DEFINE_string(
        "docs", "", "Comma-separated markdown files whose generated blocks "
        "(<!-- begin: <docs_prefix> table2 -->, table3, readme) are rewritten.")
    self.docs_prefix = flags.DEFINE_string("docs_prefix", "ablation",
                                           "Name prefix of those blocks.")
    self.train_only = flags.DEFINE_bool("train_only", False,
                                        "Internal: train + eval one run in --workdir.")
    flags.mark_flags_as_required(["config", "workdir"])


_FLAGS: _Flags


if __name__ == "__main__":
  from absl import app

  _FLAGS = _Flags()
  app.run(main)
