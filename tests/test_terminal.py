"""Mistakes and accidents at the terminal, through the command line: Ctrl-C, two runs in one
workdir, a stale lock, resuming or evaluating with another config, no checkpoint, usage
errors; and the parts behind them (the lock, the signal handler, ``init_from``, evaluations
named by the config).

One ``train.py`` run (the micro config's cls task, the same compile as
``test_kill_resume.py``) is interrupted by Ctrl-C; the other command-line cases run against
its workdir and stop before compiling anything, side by side."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tbgc_jax.trainer import checkpointing, cli
from tbgc_jax.trainer import evaluate as eval_lib
from tbgc_jax.trainer.lock import LOCK_NAME, LockHeld, WorkdirLock
from tbgc_jax.trainer.setup import ConfigError, Setup
from tbgc_jax.trainer.train import StopSignals
from tests import micro_config

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ("--config.tasks=('cls',)", "--config.total_steps=8")
pytestmark = pytest.mark.xdist_group("terminal")


def _env(cache_dir):
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=cache_dir)


def _command(script, workdir, *extra):
  return [sys.executable, str(ROOT / script), "--config", str(ROOT / "tests" / "micro_config.py"),
          "--workdir", str(workdir), *OVERRIDES, *extra]


def _micro_cls(**fields):
  c = micro_config.get_config("cls")
  c.total_steps = 8
  for k, v in fields.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, cache_dir):
  """``train.py`` sent SIGINT once its first step is logged: (workdir, CompletedProcess)."""
  workdir = tmp_path_factory.mktemp("interrupted")
  proc = subprocess.Popen(_command("train.py", workdir, "--config.log_every=1"),
                          env=_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  rows, t0 = workdir / "metrics.jsonl", time.monotonic()
  while proc.poll() is None and time.monotonic() - t0 < 600:
    if rows.exists() and rows.read_text().strip():
      proc.send_signal(signal.SIGINT)
      break
    time.sleep(0.005)
  out, err = proc.communicate(timeout=600)
  return workdir, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_exits_130(interrupted):
  workdir, result = interrupted
  assert result.returncode == 130, result.stderr[-3000:]
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert len(steps) == 1 and 1 <= steps[0] < 8, steps
  assert "Ctrl-C: finishing this step and writing a checkpoint" in result.stderr
  assert f"interrupted: checkpoint of step {steps[0]} written; rerun the same command" \
      in result.stderr
  assert "Traceback" not in result.stderr
  assert not (workdir / LOCK_NAME).exists()  # released on the way out
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(steps[0]))


def _error_line(result):
  """The one line a usage error prints (and checks that it is the only output)."""
  lines = [x for x in result.stderr.splitlines() if x.strip()]
  assert result.returncode == cli.EXIT_USAGE, result.stderr[-3000:]
  assert len(lines) == 1 and not result.stdout.strip(), result.stderr[-3000:] + result.stdout
  return lines[0]


@pytest.mark.slow
def test_mistakes_at_the_command_line_print_one_line(interrupted, tmp_path, cache_dir):
  """Each case is one process; they run side by side and stop before any compile."""
  workdir, _ = interrupted
  with WorkdirLock(str(workdir), reentrant=False):  # a live run (this process) holds it
    cases = {
        "second run": _command("train.py", workdir),
        "changed method": _command("train.py", tmp_path / "copy", "--config.grad.method=upgrad",
                                   "--config.grad.hparams={}"),
        "eval, another model": _command("eval.py", workdir,
                                        "--config.model.backbone_overrides.channels=16"),
        "eval, no checkpoint": _command("eval.py", tmp_path / "empty"),
        "misspelled field": _command("train.py", tmp_path / "u1", "--config.grad.methd=upgrad"),
        "unknown method": _command("train.py", tmp_path / "u2", "--config.grad.method=clip"),
        "negative max_norm": _command("train.py", tmp_path / "u3",
                                      "--config.grad.hparams.max_norm=-1"),
    }
    # The changed-method case resumes a copy of the interrupted run (its lock is held here).
    shutil.copytree(workdir / "checkpoints", tmp_path / "copy" / "checkpoints")
    procs = {k: subprocess.Popen(c, env=_env(cache_dir), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, c in cases.items()}
    results = {}
    for k, p in procs.items():
      out, err = p.communicate(timeout=300)
      results[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
  line = {k: _error_line(r) for k, r in results.items()}
  assert line["second run"].startswith(f"train.py: error: another run is training in {workdir}")
  assert f"held by pid {os.getpid()} on host {socket.gethostname()}, started" \
      in line["second run"]
  text = line["changed method"]
  assert "grad.method is 'tbgc' there, 'upgrad' here" in text
  assert "first differing array: the checkpoint's opt_state/" in text
  assert f"--config.init_from={tmp_path / 'copy'}" in text
  # The lock never blocks eval.py: it reads the checkpoint, and refuses the other model.
  text = line["eval, another model"]
  assert "holds another model than this config builds" in text
  assert "model.backbone_overrides.channels is 8 there, 16 here" in text
  assert "has shape [8] in the checkpoint, [16] here" in text
  assert line["eval, no checkpoint"] == (
      f"eval.py: error: no finalized checkpoint under {tmp_path / 'empty' / 'checkpoints'}")
  assert line["misspelled field"].startswith("train.py: error: --config.grad.methd:")
  assert 'Did you mean "method"' in line["misspelled field"]
  assert "config.grad.method" in line["unknown method"] and "'clip'" in line["unknown method"]
  assert "config.grad.hparams.max_norm must be > 0" in line["negative max_norm"]
  # The traceback is in the log file only.
  assert "Traceback" in (tmp_path / "u2" / "train.log").read_text()
  assert not (tmp_path / "u1" / "train.log").exists()  # stopped at the flags
  # Nothing was written by the refused runs.
  assert sorted(os.listdir(tmp_path / "copy" / "checkpoints")) == \
      sorted(os.listdir(workdir / "checkpoints"))


# ---- the parts ------------------------------------------------------------------------------


def _dead_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_the_lock_names_its_holder_and_takes_over_a_stale_one(tmp_path, caplog):
  path = tmp_path / LOCK_NAME
  with WorkdirLock(str(tmp_path)) as lock:
    held = json.loads(path.read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert lock.acquire() is lock  # re-entrant within the holder
    with pytest.raises(LockHeld, match=f"held by pid {os.getpid()} on host"):
      WorkdirLock(str(tmp_path), reentrant=False).acquire()
  assert not path.exists()
  # Left by a killed run on this host: taken over, with a warning naming it.
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                              "pid_start": None, "started": "then"}))
  with WorkdirLock(str(tmp_path)):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert any("took over the lock of a run that is gone" in r.getMessage()
             for r in caplog.records)
  # A live pid whose start time differs is a reused pid: stale too.
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                              "pid_start": "0", "started": "then"}))
  with WorkdirLock(str(tmp_path)):
    pass
  # Another host's lock cannot be checked: refused, saying how to remove it.
  path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
  with pytest.raises(LockHeld, match=f"on host elsewhere.*delete {path}"):
    WorkdirLock(str(tmp_path)).acquire()
  assert WorkdirLock(str(tmp_path), enabled=False).acquire()  # processes other than 0


def test_a_second_ctrl_c_aborts_at_once():
  class Manager:
    def reached_preemption(self, step):
      return False

  signals = StopSignals(Manager())
  try:
    assert signal.getsignal(signal.SIGINT) == signals._on_signal
    assert not signals.reached(1)
    signals._on_signal(signal.SIGINT, None)
    assert signals.reached(2) and signals.reason == "sigint"
    with pytest.raises(KeyboardInterrupt):
      signals._on_signal(signal.SIGINT, None)
  finally:
    signals.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  with pytest.raises(SystemExit) as exit_info, cli.one_line_errors():
    raise KeyboardInterrupt
  assert exit_info.value.code == cli.EXIT_INTERRUPTED


@pytest.mark.slow
def test_init_from_takes_the_parameters_that_exist_and_lists_the_others(interrupted, tmp_path):
  workdir, _ = interrupted
  step = int(next(d for d in os.listdir(workdir / "checkpoints") if d.isdigit()))
  # Restoring (what eval.py does) never initialises parameters nor reads the pretrained file.
  source = Setup(_micro_cls(**{"model.pretrained": str(tmp_path / "missing.npz")}))
  want, _ = checkpointing.restore_params(source, str(workdir))
  # A new run with another classification head (a hidden layer): the backbone comes from
  # the source, the head's new layers keep their initialisation.
  setup = Setup(_micro_cls(**{"model.cls.hidden_dim": 4}))
  params, opt_state, fresh = checkpointing.load_init_from(setup, f"{workdir}:{step}", "params")
  assert opt_state is None
  assert fresh and all(p.startswith("heads/cls/") for p in fresh)
  got = checkpointing.leaves_by_value(params)
  init = checkpointing.leaves_by_value(setup.params)
  source_leaves = checkpointing.leaves_by_value(want)
  for path, value in got.items():
    shown = "/".join(p for p in path if p != "value")
    expected = init[path] if shown in fresh else source_leaves[path]
    np.testing.assert_array_equal(value, expected, err_msg=shown)
  assert any(path[0] == "backbone" for path in got)
  with pytest.raises(ConfigError, match="another structure"):
    checkpointing.load_init_from(
        setup, str(workdir), "params+opt_state",
        {"other": jax.ShapeDtypeStruct((1,), np.float32)})
  with pytest.raises(checkpointing.NoCheckpoint, match="no finalized checkpoint of step 99"):
    checkpointing.load_init_from(setup, f"{workdir}:99", "params")


class _ValidCount:
  """An evaluator type of this module: how many valid examples the split has."""

  def __init__(self, ctx):
    self.n = 0

  def update(self, batch, predictions):
    del predictions
    self.n += int(np.sum(batch["valid"]))

  def compute(self):
    return {"n": self.n}


eval_lib.register_evaluator("valid_rows", _ValidCount)


def test_evaluations_are_named_by_the_config():
  config = _micro_cls()
  assert eval_lib.eval_specs(config) == {"cls": eval_lib.EvalSpec("cls", "cls", "cls", "val", 0)}
  config.evals = {"cls": {"task": "cls"}, "size": {"type": "valid_rows", "task": "cls"}}
  specs = eval_lib.eval_specs(config)
  assert specs["size"] == eval_lib.EvalSpec("size", "valid_rows", "cls", "val", 0)
  setup = Setup(config)
  evaluation = eval_lib.Evaluation(setup.config, setup.eval_graphdef, setup.mesh)
  metrics = evaluation.run(setup.params, setup.rest, specs)
  from tbgc_jax.tasks import classification

  assert metrics["size/n"] == classification.EMBEDDED_SIZES["val"]
  assert 0.0 <= metrics["cls/top1"] <= 1.0 and metrics["score"] == metrics["cls/top1"]
  for evals, message in [({"x": {"type": "nope", "task": "cls"}}, "config.evals.x.type"),
                         ({"x": {"task": "det"}}, "config.evals.x.task"),
                         ({"x": {"task": "cls", "every": -1}}, "config.evals.x.every")]:
    config.evals = evals
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
      Setup(config)
  with pytest.raises(ValueError, match="is taken"):
    eval_lib.register_evaluator("cls", _ValidCount)
