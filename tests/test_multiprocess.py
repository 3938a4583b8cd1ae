"""Two processes on this machine (loopback coordinator, one CPU device each,
``jax.distributed``, gloo collectives) train and evaluate exactly as one process with two
devices on the same global batch. The launch line, per process ``i`` of 2:

  JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo python train.py \\
      --config tests/micro_config.py --workdir /tmp/mp --config.mesh_devices=0 \\
      --multihost --coordinator_address=127.0.0.1:<port> --num_processes=2 --process_id=<i>
"""

import json
import os
import socket
import subprocess

import pytest

from benchmarks import kill_resume

OVERRIDES = ("--config.tasks=('cls',)", "--config.total_steps=3", "--config.mesh_devices=0")
TIMEOUT = 600  # seconds; the coordinator waits at most --initialization_timeout for a peer


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, env):
  port = _free_port()
  cmd = kill_resume.train_command(workdir, OVERRIDES)
  procs = [subprocess.Popen(
      [*cmd, "--multihost", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", "--initialization_timeout=120"],
      env=dict(env, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(tmp_path):
  env = kill_resume.train_env(os.environ["JAX_COMPILATION_CACHE_DIR"])
  one = str(tmp_path / "one")
  kill_resume.reference_run(one, dict(env, JAX_NUM_CPU_DEVICES="2"), OVERRIDES)
  two = str(tmp_path / "two")
  _two_processes(two, env)
  got, want = kill_resume.final_checkpoint(two), kill_resume.final_checkpoint(one)
  assert got["step"] == want["step"] == 3
  assert kill_resume.state_differences(got["state"], want["state"]) == []
  assert sorted(got["files"]) == ["counters/metadata", "data_cls/process_0-of-2.json",
                                  "data_cls/process_1-of-2.json"]
  metrics = [json.load(open(os.path.join(d, "eval_metrics.json"))) for d in (one, two)]
  assert metrics[0] == metrics[1]
  rows = [kill_resume.log_rows(d) for d in (one, two)]
  assert rows[0] == rows[1]
