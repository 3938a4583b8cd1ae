"""The composition example runs end to end and shows what it promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multitask_nnx_example_runs_and_learns():
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "multitask_nnx.py"), "--steps", "80"],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  # Every printed after-norm is S = 0.1, for every task, whatever the before-norm.
  after = re.findall(r"trunk \|g\|\s+(\S+) -> (\S+)", out)
  assert len(after) >= 3 * 5
  assert {a for _, a in after} == {"0.1"}
  assert len({b for b, _ in after}) > 3
  # And every task's loss went down.
  line = next(x for x in out.splitlines() if x.startswith("loss first -> last"))
  for task, first, last in re.findall(r"(\w+) (\S+) -> (\S+?)(?:,|$)", line.split(": ", 1)[1]):
    assert float(last) < float(first), (task, line)
