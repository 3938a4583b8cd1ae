"""The trainer's functions lower for GPU and TPU on this CPU-only machine, with no host callback
and no CPU-only custom call (`tbgc_jax.trainer.export`)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import challenge, first_place, tiny
from tbgc_jax.trainer import export

_X = jax.ShapeDtypeStruct((4, 4), jnp.float32)


def test_the_check_finds_cpu_only_calls_and_host_callbacks():
  eigh = jax.jit(lambda x: jnp.linalg.eigh(x)[0])
  on_cpu = export.lower(eigh, (_X,), "cpu", "eigh")
  assert any("lapack" in c for c in on_cpu.custom_calls) and on_cpu.problems
  on_cuda = export.lower(eigh, (_X,), "cuda", "eigh")
  assert on_cuda.ops > 0 and on_cuda.problems == [], on_cuda
  callback = jax.jit(lambda x: jax.pure_callback(lambda a: a, x, x) + 1)
  low = export.lower(callback, (_X,), "cuda", "callback")
  assert low.problems and low.error, low


def _check(config, expected_functions):
  lowerings = export.export_trainer(config, ("cuda", "tpu"))
  assert {low.function for low in lowerings} == expected_functions
  assert {low.platform for low in lowerings} == {"cuda,tpu"}
  problems = [(low.function, low.platform, p) for low in lowerings for p in low.problems]
  assert problems == []
  assert all(low.ops > 100 for low in lowerings), export.table(lowerings)
  return lowerings


def _functions(tasks):
  return ({f"grad[{t}]" for t in tasks} | {"update"} | {f"predict[{t}]" for t in tasks})


@pytest.mark.slow
def test_challenge_config_step_lowers_for_cuda_and_tpu_at_its_per_device_batches():
  config = challenge.get_config()
  per_device = {t: int(config.data[t].batch_size) for t in config.tasks}
  assert per_device == {"det": 2, "seg": 2, "cls": 8}  # the paper's per-GPU batches
  _check(config, _functions(config.tasks))


def test_first_place_update_lowers_for_cuda_and_tpu():
  """The winning recipe's update (backbone_clip, decay groups, tree form) on InternImage-XL:
  the step's part that differs from the challenge config's."""
  config = first_place.get_config()
  assert {t: int(config.data[t].batch_size) for t in config.tasks} == {"det": 1, "seg": 2,
                                                                        "cls": 8}
  step, state, _, _, outs = export.abstract_step(config)
  low = export.lower(step.update, (state, outs), ("cuda", "tpu"), "update")
  assert low.ops > 100 and low.problems == [], low


def test_tiny_config_lowers_for_cuda_and_tpu_through_the_cli():
  out = subprocess.run(
      [sys.executable, "-m", "tbgc_jax.trainer.export", "--config", "configs/tiny.py",
       "--platforms", "cuda,tpu"], capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.stdout.splitlines()
          if line.startswith("| ") and not line.startswith("| function")}
  assert set(rows) == _functions(tiny.get_config().tasks), out.stdout
  for name, (ops, calls, _) in rows.items():
    assert int(ops) > 100 and calls.strip() == "-", (name, ops, calls)
