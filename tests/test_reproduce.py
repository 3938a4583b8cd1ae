"""The ablation runner: grid, resumability, statistics, report and Figure 1 (no training)."""

import json
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
           "step": 10,
           "wall_s": 1.0, "metrics": {k: v for k, v in _metrics(off, s).items() if k != "step"}}
          for (m, a), off in offsets.items() for s in range(seeds)]


def test_table_and_verdict_follow_the_numbers():
  offsets = {("vanilla", "plain"): 0.0, ("tbgc_star", "plain"): 1.0, ("tbgc", "plain"): 2.0}
  rows = _rows(offsets, seeds=3)
  # Seed-dependent noise that cancels in paired differences but not in the means.
  for r in rows:
    r["metrics"]["score"] += 5.0 * r["seed"]
  cells = list(offsets)
  pairs = [(("tbgc_star", "plain"), ("vanilla", "plain")),
           (("tbgc", "plain"), ("vanilla", "plain")),
           (("tbgc", "plain"), ("tbgc_star", "plain")),
           (("gone", "plain"), ("tbgc", "plain"))]
  table, summary = rp.ablation_table(rows, cells, "method", pairs)
  assert "| tbgc | 3 |" in table and "| tbgc − vanilla | 3 |" in table
  assert "Holm-corrected over the 12 tests of this table (3 pairs x 4 columns)" in table
  assert summary["family"] == 12  # the pair with a missing cell is left out
  mean, half, n = summary[("tbgc", "plain")]["overall"]
  assert mean == pytest.approx(52.0 + 5.0) and half > 5 and n == 3  # seed spread in the means
  diff, p = summary[("diff", ("tbgc", "plain"), ("vanilla", "plain"))]["overall"]
  assert diff.mean == pytest.approx(2.0) and diff.half == pytest.approx(0.0, abs=1e-9)
  assert (diff.positive, diff.negative) == (3, 0) and p < 0.05
  # det: tbgc − vanilla is +2 in every seed (the same per-seed noise in both).
  assert "+2.00 ± 0.00, 3/0, p <0.001" in table
  verdict = rp.ordering_verdict(summary, cells, ["vanilla", "TBGC*", "TBGC"])
  assert "are in this order" in verdict and "the ordering holds" in verdict
  assert "TBGC − TBGC* +1.00 ± 0.00 (3/0 seeds above/below 0, Holm p <0.001)" in verdict
  assert "12 of the 12 paired comparisons have every seed on one side" in table
  # Noisy paired differences: the means are ordered, the corrected test does not support it.
  rng = np.random.default_rng(0)
  for r in rows:
    r["metrics"]["score"] += rng.normal(0, 3)
  _, noisy = rp.ablation_table(rows, cells, "method", pairs)
  verdict = rp.ordering_verdict(noisy, cells, ["vanilla", "TBGC*", "TBGC"])
  assert "Not established" in verdict
  flipped = _rows({("vanilla", "plain"): 2.0, ("tbgc_star", "plain"): 1.0,
                   ("tbgc", "plain"): 0.0}, seeds=1)
  _, summary = rp.ablation_table(flipped, cells, "method", pairs)
  verdict = rp.ordering_verdict(summary, cells, ["vanilla", "TBGC*", "TBGC"])
  assert "are not in this order" in verdict and "one seed, no interval" in verdict
  _, partial = rp.ablation_table(flipped[:1], cells, "method", pairs)
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
    for seed in (0, 1):
      _write_metrics_jsonl(str(tmp_path / "runs" / f"{m}-plain-s{seed}" / "metrics.jsonl"))
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.reproduce", "--config", "configs/tiny.py",
       f"--workdir={tmp_path}", "--report_only", "--methods=vanilla,tbgc"],
      cwd=_ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  report = (tmp_path / "report.md").read_text()
  assert "## Table 2" in report and "## Table 3" in report and "figure1.png" in report
  assert "| multi_branch | 2 |" in report and "multi_branch − parallel" in report
  assert "parallel < multi-branch: the mean overall scores" in report
  assert "| vanilla | 2 | 50.05 ± " in report  # det mAP50 in percent (50.0 and 50.1)
  assert (tmp_path / "figure1.png").stat().st_size > 1000
  stamp = (tmp_path / "figure1.txt").read_text()
  assert "seeds 0, 1" in stamp and "10 steps" in stamp and "jax 0." in stamp
  assert "python -m benchmarks.reproduce" in stamp and stamp.strip() in report
  norms = [json.loads(line) for line in open(tmp_path / "grad_norms.jsonl")]
  assert sorted(r["run"] for r in norms) == ["tbgc-plain-s0", "tbgc-plain-s1",
                                             "vanilla-plain-s0", "vanilla-plain-s1"]
  assert norms[0]["step"] == [0, 10, 20, 30, 40] and norms[0]["seg/backbone_grad_norm"][0] == 10
  # Median per seed of the raw norms under vanilla: det 1, seg 10, cls 100 in both seeds.
  assert "| 0–100 | 1.0 / 1.0 | 10.0 / 10.0 | 100.0 / 100.0 |" in report
