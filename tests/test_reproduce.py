"""The ablation runner: grid, resumability, statistics, report and Figure 1 (no training)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import reproduce as rp

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_grid_is_table2_plus_table3_each_cell_once_per_seed():
  runs = rp.make_grid(rp.PAPER_METHODS, rp.AUGMENT_MODES, seeds=3)
  cells = {(r.method, r.augment_mode) for r in runs}
  assert cells == {(m, "plain") for m in rp.PAPER_METHODS} | {("tbgc", "parallel"),
                                                              ("tbgc", "multi_branch")}
  assert len(runs) == len(set(runs)) == 6 * 3
  assert [r.seed for r in runs[:6]] == [0] * 6  # every cell gets its first seed first


def test_full_grid_and_bad_arguments():
  runs = rp.make_grid(("vanilla", "tbgc"), ("plain", "parallel", "multi_branch"), 2, "full")
  assert len(runs) == 2 * 3 * 2 and len({r.name for r in runs}) == 12
  with pytest.raises(ValueError, match="--grid"):
    rp.make_grid(("tbgc",), (), 1, "diagonal")
  with pytest.raises(ValueError, match="--seeds"):
    rp.make_grid(("tbgc",), (), 0)


def test_interval_is_the_student_t_interval():
  mean, half = rp.interval([1.0, 2.0, 3.0])
  # t_{0.975, 2} = 4.302652729..., sd = 1.
  assert mean == 2.0 and half == pytest.approx(4.302652729 / math.sqrt(3), rel=1e-8)
  assert math.isnan(rp.interval([5.0])[1]) and rp.interval([5.0])[0] == 5.0
  rng = np.random.default_rng(0)
  # Coverage: about 95% of intervals from normal samples contain the true mean.
  hits = 0
  for _ in range(400):
    m, h = rp.interval(rng.normal(1.0, 2.0, size=5))
    hits += abs(m - 1.0) <= h
  assert 0.91 <= hits / 400 <= 0.99


def _metrics(score_offset: float, seed: int) -> dict:
  noise = 0.1 * seed
  return {"det/mAP50": 50 + score_offset + noise, "seg/mIoU": 40 + score_offset,
          "cls/top1": 60 + score_offset - noise, "score": 50 + score_offset, "step": 10}


def test_run_grid_skips_finished_runs_and_retries_failed_ones(tmp_path):
  runs = rp.make_grid(("vanilla", "tbgc"), (), 2)
  calls, attempts = [], {}

  def runner(run, run_dir):
    calls.append(run.name)
    attempts[run.name] = attempts.get(run.name, 0) + 1
    if run.name == "tbgc-plain-s1" and attempts[run.name] == 1:
      raise RuntimeError("killed")
    return _metrics(1.0 if run.method == "tbgc" else 0.0, run.seed)

  logged = []
  rows = rp.run_grid(runs, str(tmp_path), runner, log=logged.append)
  assert {r["run"] for r in rows} == {r.name for r in runs} - {"tbgc-plain-s1"}
  assert any("FAILED" in line and "tbgc-plain-s1" in line for line in logged)
  # A torn last line from a crash mid-write is ignored, not fatal.
  with open(tmp_path / "results.jsonl", "a") as f:
    f.write('{"run": "torn')
  calls.clear()
  rows = rp.run_grid(runs, str(tmp_path), runner, log=logged.append)
  assert calls == ["tbgc-plain-s1"]  # only the failed run is run again
  assert sorted(r["run"] for r in rows) == sorted(r.name for r in runs)
  row = next(r for r in rows if r["run"] == "tbgc-parallel-s0")
  assert row["metrics"]["score"] == 51.0 and "step" not in row["metrics"]
  assert row["step"] == 10 and row["wall_s"] >= 0


def _rows(offsets: dict, seeds: int) -> list[dict]:
  return [{"run": f"{m}-{a}-s{s}", "config": "c", "method": m, "augment_mode": a, "seed": s,
           "wall_s": 1.0, "metrics": {k: v for k, v in _metrics(off, s).items() if k != "step"}}
          for (m, a), off in offsets.items() for s in range(seeds)]


def test_table_and_verdict_follow_the_numbers():
  offsets = {("vanilla", "plain"): 0.0, ("tbgc_star", "plain"): 1.0, ("tbgc", "plain"): 2.0}
  rows = _rows(offsets, seeds=3)
  # Seed-dependent noise that cancels in paired differences but not in the means.
  for r in rows:
    r["metrics"]["score"] += 5.0 * r["seed"]
  cells = list(offsets)
  table, summary = rp.ablation_table(rows, cells, "method", ("vanilla", "plain"))
  assert "| tbgc | 3 |" in table and "tbgc − vanilla" in table
  mean, half = summary[("tbgc", "plain")]["overall"]
  assert mean == pytest.approx(52.0 + 5.0) and half > 5  # seed spread dominates the mean's CI
  dmean, dhalf = summary[("diff", ("tbgc", "plain"))]["overall"]
  assert dmean == pytest.approx(2.0) and dhalf == pytest.approx(0.0, abs=1e-9)
  verdict = rp.ordering_verdict(summary, cells, ["vanilla", "TBGC*", "TBGC"])
  assert "holds" in verdict and "does not hold" not in verdict
  assert "TBGC: +2.00 ± 0.00 over 3 seeds (interval excludes 0)" in verdict
  flipped = _rows({("vanilla", "plain"): 2.0, ("tbgc_star", "plain"): 1.0,
                   ("tbgc", "plain"): 0.0}, seeds=1)
  _, summary = rp.ablation_table(flipped, cells, "method", ("vanilla", "plain"))
  verdict = rp.ordering_verdict(summary, cells, ["vanilla", "TBGC*", "TBGC"])
  assert "does not hold" in verdict and "one seed, no interval" in verdict
  _, partial = rp.ablation_table(flipped[:1], cells, "method", ("vanilla", "plain"))
  assert rp.ordering_verdict(partial, cells, ["a", "b", "c"]).startswith("Not all runs")


def _write_metrics_jsonl(path, tasks=("det", "seg", "cls")):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for step in range(0, 50, 10):
      row = {"step": step}
      for k, t in enumerate(tasks):
        row[f"{t}/backbone_grad_norm"] = 10.0 ** k
        row[f"{t}/backbone_grad_norm_after"] = 0.1
      f.write(json.dumps(row) + "\n")


def test_report_and_figure1_through_the_cli(tmp_path):
  offsets = {("vanilla", "plain"): 0.0, ("tbgc", "plain"): 2.0, ("tbgc", "parallel"): 1.0,
             ("tbgc", "multi_branch"): 1.5}
  with open(tmp_path / "results.jsonl", "w") as f:
    for row in _rows(offsets, seeds=2):  # as train.py reports them: fractions
      row["metrics"] = {k: v / 100 for k, v in row["metrics"].items()}
      f.write(json.dumps(row) + "\n")
  for m in ("vanilla", "tbgc"):
    _write_metrics_jsonl(str(tmp_path / "runs" / f"{m}-plain-s0" / "metrics.jsonl"))
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.reproduce", "--config", "configs/tiny.py",
       f"--workdir={tmp_path}", "--report_only", "--methods=vanilla,tbgc"],
      cwd=_ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  report = (tmp_path / "report.md").read_text()
  assert "## Table 2" in report and "## Table 3" in report and "figure1.png" in report
  assert "| multi_branch | 2 |" in report and "multi_branch − parallel" in report
  assert "parallel < multi-branch holds" in report
  assert "| vanilla | 2 | 50.05 ± " in report  # det mAP50 in percent (50.0 and 50.1)
  assert (tmp_path / "figure1.png").stat().st_size > 1000
