"""End to end, the tiny config's code paths at micro sizes (tests/micro_config.py): trains,
checkpoints, resumes bitwise, evaluates; eval.py CLI; the same step on 1 and 8 devices; config
validation."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest

from tbgc_jax.data import pipeline
from tbgc_jax.data.fields import pop_counts
from tbgc_jax.tasks import classification, get_task, segmentation
from tbgc_jax.trainer import setup as setup_lib
from tbgc_jax.trainer.checkpointing import restore_params
from tbgc_jax.trainer.evaluate import evaluate
from tbgc_jax.trainer.setup import Setup, validate_config
from tbgc_jax.trainer.sharding import shared_batch
from tbgc_jax.trainer.train import run_summary, train_and_evaluate
from tests import micro_config

ROOT = Path(__file__).resolve().parents[1]


def _config(**overrides):
  c = micro_config.get_config("det,seg,cls")
  c.total_steps = 4
  c.log_every = 2
  c.checkpoint_every = 2
  c.mesh_devices = 1
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _params(workdir, config):
  params, step = restore_params(Setup(config), workdir)
  return jax.device_get(params), step


# Same micro det/seg/cls model as the other e2e test of this group: one worker runs both, the
# second finds the per-task gradient executables in the compilation cache.
@pytest.mark.slow
@pytest.mark.xdist_group("micro_det_seg_cls")
def test_train_stop_resume_evaluate_and_eval_cli(tmp_path, cache_dir):
  config = _config()
  stopped = str(tmp_path / "stopped")
  # A run stopped after step 2 (as a preemption would), then resumed to the end ...
  assert train_and_evaluate(config, stopped, stop_after=2) == {}
  assert sorted(os.listdir(os.path.join(stopped, "checkpoints"))) == ["2"]
  metrics = train_and_evaluate(config, stopped)
  # ... ends with exactly the parameters of an uninterrupted run.
  straight = str(tmp_path / "straight")
  assert train_and_evaluate(config, straight, evaluate=False) == {}
  got, step = _params(stopped, config)
  want, _ = _params(straight, config)
  assert step == 4
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)

  assert set(metrics) == {"det/mAP50", "det/mAP50_agnostic", "seg/mIoU", "cls/top1", "score"}
  assert all(0.0 <= v <= 1.0 for v in metrics.values())
  np.testing.assert_allclose(metrics["score"], np.mean(
      [metrics["det/mAP50"], metrics["seg/mIoU"], metrics["cls/top1"]]))
  rows = [json.loads(x) for x in open(os.path.join(stopped, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [0, 1, 2, 3]
  for task in ("det", "seg", "cls"):
    # TBGC: every task's backbone contribution has norm max_norm.
    assert all(abs(r[f"{task}/backbone_grad_norm_after"] - 0.1) < 1e-5 for r in rows)
    assert all(np.isfinite(r[f"{task}/loss"]) for r in rows)
  for name in ("loss.png", "backbone_grad_norm.png", "eval_metrics.json"):
    assert os.path.exists(os.path.join(stopped, name)), name

  # eval.py on the latest checkpoint, with the challenge submission.
  submission = tmp_path / "submission.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache_dir)
  result = subprocess.run(
      [sys.executable, str(ROOT / "eval.py"), "--config",
       f"{ROOT / 'tests' / 'micro_config.py'}:det,seg,cls",
       "--workdir", stopped, "--config.mesh_devices=1", f"--submission={submission}"],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "score (mean)" in result.stdout
  # Library INFO logs (orbax, jax) go to the log file, not to the terminal.
  assert not re.search(r"^I\d{4} ", result.stderr, re.M), result.stderr[:2000]
  assert re.search(r" INFO ", open(os.path.join(stopped, "eval.log")).read())
  cli = json.load(open(os.path.join(stopped, "eval_metrics_4.json")))
  for k, v in metrics.items():
    np.testing.assert_allclose(cli[k], v, atol=1e-6, err_msg=k)
  sub = json.load(open(submission))
  assert set(sub) == {"cls", "dec", "seg"}
  val_size = {"cls": classification.EMBEDDED_SIZES["val"],
              "seg": segmentation.EMBEDDED_SIZES["val"]}
  assert len(sub["cls"]) == val_size["cls"]
  assert all(isinstance(v, int) for v in sub["cls"].values())
  assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in sub["dec"])
  assert len(sub["seg"]) == val_size["seg"]
  # The gallery: every task's first examples, truth beside prediction, one PNG.
  gallery = os.path.join(stopped, "predictions_val_4.png")
  assert f"predictions beside the ground truth: {gallery}" in result.stdout
  image = cv2.imread(gallery)
  assert image is not None and image.shape[0] > 3 * 64 and image.shape[1] >= 4 * 2 * 64


def test_eval_does_not_load_the_training_loop():
  """Every import statement of eval.py, run in a fresh process: the loop module stays out."""
  tree = ast.parse((ROOT / "eval.py").read_text())
  imports = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
  code = "\n".join(imports + ["import sys", "print(sorted(m for m in sys.modules "
                               "if m.startswith('tbgc_jax.trainer.')))"])
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
                       timeout=300, check=True)
  loaded = ast.literal_eval(out.stdout.strip().splitlines()[-1])
  assert {"tbgc_jax.trainer.setup", "tbgc_jax.trainer.checkpointing"} <= set(loaded), loaded
  assert "tbgc_jax.trainer.train" not in loaded, loaded


@pytest.mark.slow
def test_one_and_eight_devices_agree(tmp_path, cache_dir):
  """Same global batch (8 cls images) on a 1-device and an 8-device mesh."""
  results = {}
  for devices, per_device in ((1, 8), (8, 1)):
    config = _config(**{"tasks": ("cls",), "mesh_devices": devices, "total_steps": 3,
                        "data.cls.batch_size": per_device, "checkpoint_every": 2})
    workdir = str(tmp_path / f"d{devices}")
    train_and_evaluate(config, workdir, stop_after=2)
    results[devices] = _params(workdir, config)[0]
  for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[8]), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_fused_and_per_task_steps_train_alike(tmp_path):
  """Both step forms compile before the first batch (on `train_batch_shapes`) and end at the
  same parameters."""
  results = {}
  for mode in ("per_task_jit", "fused"):
    config = _config(**{"tasks": ("cls",), "total_steps": 2, "grad.step_mode": mode})
    workdir = str(tmp_path / mode)
    train_and_evaluate(config, workdir, evaluate=False)
    results[mode] = _params(workdir, config)[0]
  for a, b in zip(jax.tree.leaves(results["per_task_jit"]), jax.tree.leaves(results["fused"]),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_the_compiled_batch_layout_is_the_pipelines():
  """`train_batch_shapes` (what the step is compiled for) matches real training batches, and
  a batch that does not match is refused naming its task and field."""
  config = _config(**{"tasks": ("det", "cls")})
  setup = Setup(config)
  want = setup_lib.train_batch_shapes(setup.config, setup.mesh)
  batches = {}
  for t in setup.tasks:
    it = pipeline.train_iterator(setup.config.data[t], get_task(t).data, seed=0, num_epochs=1,
                                 batch_size=setup.local_batch_size(t))
    host = next(it)
    host.pop("skipped")
    pop_counts(host)  # the trainer logs the drop counters (det: num_dropped_boxes)
    batches[t] = host
  setup_lib.check_batches(batches, want)
  assert want["det"]["image"].sharding == setup.data_sharding
  bad = {**batches, "cls": {**batches["cls"], "label": batches["cls"]["label"].astype(np.int64)}}
  with pytest.raises(ValueError, match="task 'cls', batch field 'label': int64"):
    setup_lib.check_batches(bad, want)
  del bad["cls"]["label"]
  with pytest.raises(ValueError, match="task 'cls': the training batch has fields"):
    setup_lib.check_batches(bad, want)


@pytest.mark.slow
def test_evaluation_is_the_same_on_one_and_eight_devices():
  """Every host reads the whole val batch; the rows are split over the mesh, not repeated."""
  metrics = {}
  for devices, per_device in ((1, 8), (8, 1)):
    setup = Setup(_config(**{"tasks": ("cls",), "mesh_devices": devices,
                             "data.cls.batch_size": per_device}))
    batch = {"x": np.arange(16.0).reshape(8, 2)}
    shared = shared_batch(batch, setup.data_sharding)["x"]
    np.testing.assert_array_equal(jax.device_get(shared), batch["x"])
    assert len(shared.addressable_shards) == devices
    metrics[devices], _ = evaluate(setup.config, setup.eval_graphdef, setup.params, setup.rest,
                                   setup.mesh)
  assert metrics[1] == metrics[8]
  assert 0.0 <= metrics[1]["cls/top1"] <= 1.0


@pytest.mark.parametrize("key,value,message", [
    ("grad.method", "clip", "config.grad.method"),
    ("tasks", ("det", "pose"), "config.tasks"),
    ("augment_mode", "mixed", "config.augment_mode"),
    ("grad.max_norm", 0.0, "config.grad.max_norm"),
    ("grad.step_mode", "eager", "config.grad.step_mode"),
    ("loss_weights.seg", 0.0, "config.loss_weights.seg"),
])
def test_invalid_configs_fail_at_start(key, value, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    Setup(_config(**{key: value}))


@pytest.mark.parametrize("mode", ["plain", "parallel", "multi_branch"])
def test_augment_modes_are_valid(mode):
  validate_config(_config(augment_mode=mode))


def test_drop_path_masks_follow_the_step_key():
  """Stochastic depth must differ between step keys and repeat for the same key."""
  from tbgc_jax.data import pipeline
  from tbgc_jax.trainer.step import make_loss_fns

  config = _config(**{"tasks": ("cls",), "model.drop_path_rate": 0.5})
  setup = Setup(config)
  loss = jax.jit(make_loss_fns(setup.graphdef, ("cls",), {"cls": 1.0})["cls"])
  batch = next(pipeline.train_iterator(config.data.cls, get_task("cls").data, seed=0, num_epochs=1))
  values = [float(loss(setup.params, batch, setup.rest, jax.random.PRNGKey(k))[0])
            for k in (0, 0, 1)]
  assert values[0] == values[1]
  assert values[0] != values[2]


def test_run_summary_says_what_the_run_trains():
  setup = Setup(_config(**{"tasks": ("seg", "cls"), "grad.method": "tbgc_star"}))
  text = run_summary(setup, {"seg": [0] * 30, "cls": [0] * 1200}, total_steps=8,
                     steps_per_epoch=300, workdir="/w")
  params = sum(x.size for x in jax.tree.leaves(setup.params))
  lines = text.splitlines()
  assert lines[0] == "2 tasks on 1 cpu device(s); workdir /w"
  assert lines[1].split() == ["seg", "30", "train", "examples,", "2", "per", "device", "per",
                              "step"]
  assert "1,200 train examples, 4 per device" in lines[2]
  assert f"{params / 1e6:.1f} M parameters" in lines[3]
  assert "gradient method: tbgc_star (max_norm 0.1)" in lines[3]
  assert lines[4].strip() == "8 steps (0.0266667 epochs of 300), seed 0"
  # A method without a clipping norm shows none.
  setup = Setup(_config(**{"tasks": ("cls",), "grad.method": "upgrad"}))
  text = run_summary(setup, {"cls": [0] * 8}, total_steps=2, steps_per_epoch=2, workdir="/w")
  assert text.splitlines()[0] == "1 task on 1 cpu device(s); workdir /w"
  assert "gradient method: upgrad;" in text and "max_norm" not in text
