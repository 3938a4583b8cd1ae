"""Reliability, fast parts: the non-finite task policy for every gradient method, damaged
checkpoints at restore, logs kept once per step on resume, and data errors inside grain
worker processes. The kill/preemption harness is in ``test_kill_resume.py``."""

import dataclasses
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tbgc_jax
from configs import tiny
from tbgc_jax.data import pipeline
from tbgc_jax.data.records import RecordSource
from tbgc_jax.tasks import get_task
from tbgc_jax.trainer import checkpointing, logs
from tbgc_jax.trainer.optim import make_optimizer
from tbgc_jax.trainer.setup import validate_config
from tbgc_jax.trainer.step import _update

TASKS = ("a", "b")


def _mask(params):
  return {"backbone": jax.tree.map(lambda _: True, params["backbone"]),
          "head": jax.tree.map(lambda _: False, params["head"])}


def _toy_params():
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  return {"backbone": {"w": jax.random.normal(k[0], (4, 3))},
          "head": {"w": jax.random.normal(k[1], (3, 2))}}


# Hyperparameters without a default (per task, or naming a task) for the two tasks below.
_REQUIRED = {"constant": {"weights": {"a": 1.0, "b": 2.0}}, "trimmed_mean": {"trim_number": 0},
             "pcd": {"primary": "b", "tau": {"a": 0.2}}}


def _run_updates(method, losses_and_grads):
  """Runs the trainer's update (method with its non-finite policy + AdamW) over given steps."""
  config = tiny.get_config()
  config.grad.method = method
  hparams = dict(_REQUIRED.get(method, {}))
  if "max_norm" in tbgc_jax.get_method(method).hyperparameters:
    hparams["max_norm"] = 0.1  # the config's TBGC S, for every method with a clipping norm
  config.grad.hparams = hparams
  tx, schedules = make_optimizer(config, TASKS, _mask, total_steps=10, steps_per_epoch=5)
  params = _toy_params()
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(0)}
  update = jax.jit(lambda state, losses, grads: _update(
      state, losses, {t: {} for t in TASKS}, grads, tasks=TASKS, tx=tx, schedules=schedules))
  history = []
  for losses, grads in losses_and_grads:
    state, metrics = update(state, losses, grads)
    history.append((jax.device_get(state), jax.device_get(metrics)))
  return history


def _steps(poison):
  """Five steps of per-task (loss, grads); ``poison``: {step: how task "a" goes bad}."""
  rng = np.random.default_rng(0)
  out = []
  for step in range(5):
    grads = {t: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                             _toy_params()) for t in TASKS}
    losses = {t: jnp.float32(1.0) for t in TASKS}
    kind = poison.get(step)
    if kind == "nan_loss":
      losses["a"] = jnp.float32(np.nan)
    elif kind == "inf_grad":
      grads["a"]["head"]["w"] = grads["a"]["head"]["w"].at[0, 0].set(np.inf)
    elif kind == "zero":  # the reference: task "a" contributes nothing this step
      grads["a"] = jax.tree.map(jnp.zeros_like, grads["a"])
    out.append((losses, grads))
  return out


@pytest.mark.slow
# Krum needs three tasks or more; it drops a task through the same engine (test_methods.py).
@pytest.mark.parametrize("method", [m for m in tbgc_jax.method_names() if m != "krum"])
def test_a_nonfinite_task_is_dropped_and_counted_for_every_method(method):
  poisoned = _run_updates(method, _steps({1: "nan_loss", 2: "inf_grad"}))
  reference = _run_updates(method, _steps({1: "zero", 2: "zero"}))
  for step, ((state, metrics), (ref, _)) in enumerate(zip(poisoned, reference, strict=True)):
    # Dropped = exactly the update without that task's gradient; the other task trains.
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref["params"]),
                    strict=True):
      np.testing.assert_array_equal(a, b, err_msg=f"{method} step {step}")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    assert metrics["params_finite"] == 1
    assert metrics["task/a/nonfinite"] == int(step in (1, 2))
    assert metrics["task/b/nonfinite"] == 0
  moved = [not np.array_equal(poisoned[s][0]["params"]["backbone"]["w"],
                              poisoned[s - 1][0]["params"]["backbone"]["w"]) for s in (1, 2)]
  assert all(moved), "task b must still train while task a is dropped"
  streaks = [int(m["task/a/nonfinite_streak"]) for _, m in poisoned]
  assert streaks == [0, 1, 2, 0, 0]
  assert [int(m["task/a/nonfinite_total"]) for _, m in poisoned] == [0, 1, 2, 2, 2]
  # One mechanism: the method's own counters, in its state (checkpointed with it).
  final = [x for x in jax.tree.leaves(poisoned[-1][0]["opt_state"],
                                      is_leaf=lambda x: isinstance(x, tbgc_jax.NonFinite))
           if isinstance(x, tbgc_jax.NonFinite)]
  assert len(final) == 1
  assert int(final[0].total["a"]) == 2 and int(final[0].total["b"]) == 0


def test_the_host_check_stops_after_k_in_a_row_and_on_nonfinite_params():
  row = {"task/a/nonfinite": 1, "task/a/nonfinite_streak": 2, "task/a/nonfinite_total": 4,
         "a/loss": float("nan"), "task/b/nonfinite": 0, "params_finite": 1}
  assert logs.check_nonfinite(7, row, TASKS, max_consecutive=3) == ["a"]
  with pytest.raises(FloatingPointError, match=r"task 'a'.*2 consecutive steps.*step 7"):
    logs.check_nonfinite(7, row, TASKS, max_consecutive=2)
  with pytest.raises(FloatingPointError, match="non-finite parameters after step 9"):
    logs.check_nonfinite(9, {**row, "task/a/nonfinite": 0, "params_finite": 0}, TASKS, 3)


@pytest.mark.parametrize("policy,k,message", [("skip", 3, "config.nonfinite.policy"),
                                              ("drop_task", 0, "max_consecutive")])
def test_invalid_nonfinite_config_fails_at_start(policy, k, message):
  config = tiny.get_config()
  config.nonfinite.policy, config.nonfinite.max_consecutive = policy, k
  with pytest.raises(ValueError, match=message):
    validate_config(config)


def test_resumed_logs_hold_each_step_once(tmp_path):
  writer = logs.MetricWriter(str(tmp_path))
  for step in range(6):
    writer.write(step, {"x": step})
  writer.close()
  with open(writer.path, "a") as f:
    f.write('{"step": 6, "x"')  # a row cut short by a kill
  # Resumed from the checkpoint of step 3: rows 3.. are written again by the new run.
  writer = logs.MetricWriter(str(tmp_path), resume_step=3)
  for step in range(3, 8):
    writer.write(step, {"x": step})
  writer.close()
  assert [r["step"] for r in logs.read_jsonl(writer.path)] == list(range(8))
  # Killed before its first checkpoint: the next run starts from step 0 and logs it all again.
  writer = logs.MetricWriter(str(tmp_path), resume_step=0)
  writer.write(0, {"x": 0})
  writer.close()
  assert [r["step"] for r in logs.read_jsonl(writer.path)] == [0]


# ---- damaged checkpoints -------------------------------------------------------------------


def _ckpt_setup(workdir):
  config = tiny.get_config()
  config.keep_checkpoints = 3
  mngr = checkpointing.checkpoint_manager(str(workdir), config)

  def iterators():
    return {"cls": iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())}

  return config, mngr, iterators


def _save_steps(workdir, steps=(1, 2, 3)):
  config, mngr, iterators = _ckpt_setup(workdir)
  its = iterators()
  for step in steps:
    next(its["cls"])
    state = {"w": jnp.arange(1000.0) + step, "step": jnp.int32(step)}
    counters = {"data_skipped": {"cls": [step]}}
    mngr.save(step, args=checkpointing.save_args(state, its, config, counters))
  mngr.wait_until_finished()
  mngr.close()


def _files(step_dir, part):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
                if part in os.path.join(d, f))


def _damage(step_dir, how):
  if how == "truncated array data":
    for path in _files(step_dir, "ocdbt.process_0/d/"):
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == "missing array data":
    for path in _files(step_dir, "ocdbt.process_0/d/"):
      os.remove(path)
  elif how == "truncated manifest":
    for path in _files(step_dir, "state/manifest.ocdbt"):
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == "missing state metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif how == "truncated data-iterator state":
    for path in _files(step_dir, "data_cls/process_0"):
      os.truncate(path, 5)
  elif how == "missing data-iterator state":
    for path in _files(step_dir, "data_cls/process_0"):
      os.remove(path)
  else:
    raise ValueError(how)


def _restore(workdir):
  config, mngr, iterators = _ckpt_setup(workdir)
  its = iterators()
  abstract = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
  try:
    restored, step = checkpointing.restore_latest_intact(
        mngr, checkpointing.restore_args(abstract, its), str(workdir))
  finally:
    mngr.close()
  return restored, step, its


DAMAGES = ["truncated array data", "missing array data", "truncated manifest",
           "missing state metadata", "truncated data-iterator state",
           "missing data-iterator state"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact(tmp_path, caplog, how):
  _save_steps(tmp_path)
  _damage(tmp_path / "checkpoints" / "3", how)
  with caplog.at_level(logging.WARNING):
    restored, step, its = _restore(tmp_path)
  assert step == 2
  np.testing.assert_array_equal(restored["state"]["w"], np.arange(1000.0) + 2)
  assert restored["counters"] == {"data_skipped": {"cls": [2]}}
  np.testing.assert_array_equal(next(its["cls"]), [4, 5])  # the iterator resumes after step 2
  assert any("checkpoint step 3" in r.getMessage() and "cannot be restored" in r.getMessage()
             for r in caplog.records)
  # The damaged step is set aside (not deleted); the run can save step 3 again.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert [d.split(".")[0] for d in os.listdir(tmp_path / "checkpoints_damaged")] == ["3"]
  _save_steps(tmp_path, steps=(3,))
  assert _restore(tmp_path)[1] == 3


def test_an_unfinished_save_is_ignored(tmp_path):
  _save_steps(tmp_path, steps=(1, 2))
  # What a kill during an asynchronous save leaves: a temporary directory.
  tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  tmp.mkdir()
  (tmp / "state").mkdir()
  assert _restore(tmp_path)[1] == 2


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  _save_steps(tmp_path, steps=(1, 2))
  for step in ("1", "2"):
    _damage(tmp_path / "checkpoints" / step, "missing state metadata")
  with pytest.raises(RuntimeError, match=r"step 2: .*step 1: .*Not starting from scratch"):
    _restore(tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # nothing moved


# ---- data errors in grain worker processes -------------------------------------------------


def _broken_source(embedded_root, tmp_path, bad=3):
  cfg = tiny.get_config().data.cls
  cfg.source.root = embedded_root
  source = pipeline.make_source(cfg, get_task("cls").data, "train")
  records = list(source.records)
  missing = str(tmp_path / "gone.png")  # removed after the index was read
  records[bad] = dataclasses.replace(records[bad], image_path=missing)
  return cfg, RecordSource(records, get_task("cls").data, source.num_classes), missing


def _epoch(cfg, source, policy):
  cfg.policy = policy
  it = pipeline.train_iterator(cfg, get_task("cls").data, seed=0, num_epochs=1, batch_size=16,
                               num_workers=1, source=source)
  return list(it)


def test_a_reader_error_in_a_worker_names_the_record_and_file(embedded_root, tmp_path):
  cfg, source, missing = _broken_source(embedded_root, tmp_path)
  with pytest.raises(Exception) as info:
    _epoch(cfg, source, "strict")
  text = str(info.value) + "".join(str(e) for e in _chain(info.value))
  assert "cls: record 3" in text and missing in text


def test_a_reader_error_in_a_worker_is_a_counted_skip(embedded_root, tmp_path):
  cfg, source, _ = _broken_source(embedded_root, tmp_path)
  batches = _epoch(cfg, source, "skip")
  assert len(batches) == len(source) // 16
  skipped = sum(int(b["skipped"].sum()) for b in batches)
  indices = np.concatenate([b["index"] for b in batches])
  seen = len(indices)
  # Record 3 was replaced by the next one (4), which therefore appears twice unless it
  # fell in the dropped remainder.
  assert skipped == int(3 in _shuffled(len(source))[:seen])
  assert 3 not in indices


def _shuffled(n):
  return list(grain.MapDataset.range(n).shuffle(seed=0))


def _chain(e):
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
    yield e
