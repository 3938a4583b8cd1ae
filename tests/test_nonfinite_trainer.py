"""The trainer under a diverging task and bad records: NaN injected into one task's loss and
gradient at chosen steps (a test-only wrapper of the step's per-task gradient function), and
unreadable records under the "skip" policy. Every gradient method's handling is covered,
cheaply, in ``test_reliability.py``; this runs the whole training loop on one."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tbgc_jax.data import pipeline
from tbgc_jax.data.records import RecordSource
from tbgc_jax.trainer import checkpointing, logs
from tbgc_jax.trainer import train as train_lib
from tbgc_jax.trainer.setup import Setup
from tbgc_jax.trainer.step import make_train_step
from tests import micro_config

_MAKE_SOURCE = pipeline.make_source


def _poison(monkeypatch, task, bad_steps):
  """Makes ``task``'s loss and gradient NaN at the given (0-based) steps."""
  def make(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)
    real = step_fn.task_grads[task]

    def poisoned(params, rest, batch, rng, step):
      (loss, aux), grads = real(params, rest, batch, rng, step)
      if int(step) in bad_steps:
        loss = loss * jnp.nan
        grads = jax.tree.map(lambda g: g * jnp.nan, grads)
      return (loss, aux), grads

    # The wrapper branches on the step in Python, so it cannot be lowered ahead of time: the
    # step is marked compiled and runs its functions as plain jits.
    step_fn = dataclasses.replace(step_fn, task_grads={**step_fn.task_grads, task: poisoned},
                                  _compiled=[])
    step_fn._compiled.append(step_fn)
    return step_fn

  monkeypatch.setattr(train_lib, "make_train_step", make)


def _break_records(monkeypatch, task, every):
  """Points every ``every``-th record of ``task`` at a missing file (removed after indexing)."""
  def make_source(cfg, t, split):
    source = _MAKE_SOURCE(cfg, t, split)
    if t.name != task or split != "train":
      return source
    records = [dataclasses.replace(r, image_path=r.image_path + ".gone") if i % every == 0
               else r for i, r in enumerate(source.records)]
    return RecordSource(records, t, source.num_classes)

  monkeypatch.setattr(train_lib.pipeline, "make_source", make_source)


def _config(**nonfinite):
  config = micro_config.get_config()
  config.total_steps = 6
  config.data.cls.policy = "skip"
  config.nonfinite.update(nonfinite)
  return config


@pytest.mark.slow
def test_a_diverging_task_is_dropped_logged_and_stops_the_run_after_k_in_a_row(
    tmp_path, monkeypatch, cache_dir):
  _break_records(monkeypatch, "cls", every=7)
  # Isolated non-finite steps: dropped, counted, logged; the run goes on.
  _poison(monkeypatch, "seg", {1, 3})
  workdir = str(tmp_path / "isolated")
  assert train_lib.train_and_evaluate(_config(max_consecutive=2), workdir, stop_after=5) == {}
  rows = logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
  assert [r["seg/dropped"] for r in rows] == [0, 1, 0, 1, 0]
  assert [r["seg/dropped_total"] for r in rows] == [0, 1, 1, 2, 2]
  assert all(r["cls/dropped"] == 0 and np.isfinite(r["cls/loss"]) for r in rows)
  assert all(r["params_finite"] == 1 for r in rows)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["step"] == 5 and summary["dropped_steps"] == {"seg": 2, "cls": 0}
  # Unreadable cls records were skipped and counted, in the log rows and the summary.
  skipped = [r["cls/data_skipped"] for r in rows]
  assert skipped == sorted(skipped) and skipped[-1] > 0
  assert summary["data_skipped"] == {"seg": 0, "cls": skipped[-1]}
  params, _ = checkpointing.restore_params(Setup(_config()), workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))

  # Two in a row with max_consecutive=2: a clear stop, before that state is checkpointed.
  _poison(monkeypatch, "seg", {2, 3})
  workdir = str(tmp_path / "streak")
  with pytest.raises(FloatingPointError, match=r"task 'seg'.*2 consecutive steps.*step 3"):
    train_lib.train_and_evaluate(_config(max_consecutive=2), workdir, stop_after=5)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
