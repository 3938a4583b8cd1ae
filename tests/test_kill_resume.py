"""Kills and preemption: ``train.py`` killed (SIGKILL) while an asynchronous checkpoint save
is in flight, then sent a preemption notice (SIGTERM), restarted with the same command each
time, ends bitwise where an uninterrupted run ends. One trial here; many with
``python -m benchmarks.kill_resume --trials 10``."""

import numpy as np
import pytest

from benchmarks import kill_resume

# One task keeps the compile short; the multi-task runs are the benchmark's default.
OVERRIDES = ("--config.tasks=('cls',)", "--config.total_steps=8")


@pytest.mark.slow
def test_killed_and_preempted_runs_end_bitwise_like_an_uninterrupted_one(tmp_path, cache_dir):
  env = kill_resume.train_env(cache_dir)
  reference = str(tmp_path / "reference")
  seconds = kill_resume.reference_run(reference, env, OVERRIDES)
  workdir = str(tmp_path / "trial")
  launches = kill_resume.run_trial(
      workdir, env, ["save", "sigterm"], np.random.default_rng(0), expected_seconds=seconds,
      total_steps=8, overrides=OVERRIDES)
  killed, preempted = launches[0], launches[1]
  assert killed.fired and killed.returncode == -9
  # The preemption notice: a checkpoint at the next step boundary, then exit 0 ...
  assert preempted.fired and preempted.returncode == 0, preempted.log_tail
  assert preempted.checkpoints and max(preempted.checkpoints) < 8
  # ... and the next launch finishes from it.
  assert launches[-1].returncode == 0 and len(launches) == 3
  assert kill_resume.differences(workdir, reference) == []
