"""A task of a kind no built-in task has, defined only here: per-pixel distance to the nearest
digit stroke on the embedded segmentation scenes (a dense float target, `DenseMap`, NaN
outside the image), with an L1 loss, a one-layer head and an RMSE / abs-rel / delta1
evaluator. It trains with det, seg and cls through ``train_and_evaluate`` and is evaluated;
nothing under tbgc_jax/ knows of it. Also: keypoints and dense maps through the transforms
and batching, and the "Adding a format" example of docs/data.md."""

import json
import re
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.data import DataSpec, DenseMap, Keypoints, batching, pipeline
from tbgc_jax.data import transforms as T
from tbgc_jax.data.fields import as_fields
from tbgc_jax.data.records import read_label_map
from tbgc_jax.tasks import TaskSpec, register_task, unregister_task
from tbgc_jax.tasks.segmentation import SegmentationData
from tbgc_jax.trainer.evaluate import task_metrics
from tbgc_jax.trainer.train import train_and_evaluate
from tests import micro_config

ROOT = Path(__file__).resolve().parents[1]
SCALE = 16.0  # distances in units of 16 pixels


class DistanceData(DataSpec):
  """The segmentation scenes; the target is each pixel's distance to the nearest digit
  stroke (label != 0), in units of ``SCALE`` pixels."""

  name = "dist"
  formats = ("bdd100k",)
  embedded_format = "bdd100k"

  def fields(self, task_cfg):
    del task_cfg
    return {"dist": DenseMap(fill=float("nan"))}

  def decode(self, record, image, orig_hw, num_classes):
    del image, orig_hw, num_classes
    background = (read_label_map(record.label_path) == 0).astype(np.uint8)
    return {"dist": cv2.distanceTransform(background, cv2.DIST_L2, 3) / np.float32(SCALE)}

  def embedded_requires(self):
    return (SegmentationData(),)

  def embedded_reader_args(self, root, split):
    return SegmentationData().embedded_reader_args(root, split)


def _valid(batch):
  """Pixels that count: valid rows, inside the image, a finite target."""
  return (batch["valid"][:, None, None] & batch["image_mask"]
          & jnp.isfinite(batch["dist"]))


class DistanceHead(nnx.Module):
  """A 1x1 convolution of the finest backbone level, bilinearly upsampled to the batch."""

  def __init__(self, channels, *, rngs):
    self.conv = nnx.Conv(channels[0], 1, kernel_size=(1, 1), rngs=rngs)

  def _predict(self, features, batch):
    b, h, w = batch["image"].shape[:3]
    return jax.image.resize(self.conv(features[0]), (b, h, w, 1), "bilinear")[..., 0]

  def loss(self, features, batch, rng):
    del rng
    valid = _valid(batch)
    err = jnp.where(valid, jnp.abs(self._predict(features, batch)
                                   - jnp.where(valid, batch["dist"], 0.0)), 0.0)
    loss = err.sum() / jnp.maximum(valid.sum(), 1)
    return loss, {"l1": loss}

  def predict(self, features, batch):
    return {"dist": self._predict(features, batch)}


class DistanceEvaluator:
  """RMSE, abs-rel (over pixels with a positive target) and delta1 (the fraction of those
  within a factor 1.25), over the valid pixels of the evaluated split."""

  def __init__(self, ctx):
    del ctx
    self.sq = self.rel = self.n = self.n_pos = self.close = 0.0

  def update(self, batch, predictions):
    valid = np.asarray(_valid(batch))
    pred, true = np.asarray(predictions["dist"])[valid], np.asarray(batch["dist"])[valid]
    pos = true > 0
    self.sq += float(((pred - true) ** 2).sum())
    self.n += valid.sum()
    self.rel += float((np.abs(pred - true)[pos] / true[pos]).sum())
    ratio = np.maximum(pred[pos] / true[pos], true[pos] / np.maximum(pred[pos], 1e-6))
    self.close += float((ratio < 1.25).sum())
    self.n_pos += pos.sum()

  def compute(self):
    return {"delta1": self.close / self.n_pos, "rmse": float(np.sqrt(self.sq / self.n)),
            "abs_rel": self.rel / self.n_pos}


class DistanceTask(TaskSpec):
  name = "dist"
  data = DistanceData()
  metric = "delta1"

  def build_head(self, config, channels, *, rngs):
    return DistanceHead(channels, rngs=rngs)

  def evaluator(self, ctx):
    return DistanceEvaluator(ctx)


def _config():
  c = micro_config.get_config("det,seg,cls")
  c.tasks = ("det", "seg", "cls", "dist")
  c.data.dist = ml_collections.ConfigDict({
      "source": {"format": "embedded", "root": c.data.seg.source.root, "train": {}, "val": {}},
      "policy": "strict", "deep_check": False, "allow_outside_root": False, "num_classes": 1,
      "batch_size": 4, "image_size": (32, 32), "eval_image_size": (32, 32),
      "augment": {"mode": "plain", "plain": "random_resize(long_edge=40, ratio_min=0.8, "
                                            "ratio_max=1.2)|rotate(max_deg=10)|"
                                            "random_crop(size=(32, 32))|hflip"},
      "eval_augment": "resize_fit(size=(32, 32))"})
  c.model.dist = ml_collections.ConfigDict()
  c.loss_weights.dist = 1.0
  c.optim.lr = 1e-2
  c.optim.warmup_epochs = 0.0
  c.total_steps = 4
  c.checkpoint_every = 4
  return c


@pytest.fixture
def dist_task():
  spec = register_task(DistanceTask())
  yield spec
  unregister_task(spec.name)


# Same micro det/seg/cls model as the other e2e tests of this group: one worker runs them, the
# later ones find the per-task gradient executables in the compilation cache.
@pytest.mark.slow
@pytest.mark.xdist_group("micro_det_seg_cls")
def test_a_dense_regression_task_trains_and_evaluates_with_the_others(tmp_path, dist_task):
  config = _config()
  # The data: a float map, NaN in the padding, moved by the augmentations with the image.
  batch = pipeline.train_dataset(config.data.dist, dist_task.data, seed=0, num_epochs=1,
                                 batch_size=4)[0]
  assert batch["dist"].dtype == np.float32 and batch["dist"].shape == (4, 32, 32)
  assert np.isnan(batch["dist"][~batch["image_mask"]]).all()
  inside = batch["dist"][batch["image_mask"]]
  assert (np.nan_to_num(inside, nan=0.0) >= 0).all() and (inside > 0.1).any()

  zeros = task_metrics(config, "dist", lambda b: {"dist": np.zeros(b["dist"].shape)})
  metrics = train_and_evaluate(config, str(tmp_path))
  assert set(metrics) == {"det/mAP50", "det/mAP50_agnostic", "seg/mIoU", "cls/top1",
                          "dist/delta1", "dist/rmse", "dist/abs_rel", "score"}
  assert 0.0 <= metrics["dist/delta1"] <= 1.0 and np.isfinite(metrics["dist/abs_rel"])
  # Four steps move the prediction from 0 towards the targets.
  assert metrics["dist/rmse"] < zeros["rmse"], (metrics, zeros)
  np.testing.assert_allclose(metrics["score"], np.mean(
      [metrics[k] for k in ("det/mAP50", "seg/mIoU", "cls/top1", "dist/delta1")]))
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  train = [r for r in rows if "dist/loss" in r]
  assert [r["step"] for r in train] == [0, 1, 2, 3]
  assert np.isfinite([r["dist/loss"] for r in train]).all()
  # The boxes the detection batches dropped (none here: 24 slots) reach the logs.
  assert all(r["det/num_dropped_boxes"] == 0 for r in train)


# ---------------------------------------------------------------- kinds at the transform level


FACE = {"kp": Keypoints(num_keypoints=3, flip_pairs=((0, 1),))}  # left eye, right eye, nose


def _face(h=10, w=20):
  return {"image": np.zeros((h, w, 3), np.uint8), "index": np.int32(0),
          "orig_hw": np.int32([h, w]),
          "kp": np.float32([[3, 4, 1], [15, 5, 1], [10, 8, 1]])}


def test_hflip_swaps_left_and_right_keypoints_and_mirrors_x():
  ex = T.HFlip(p=1.0, fields=FACE).random_map(_face(), np.random.default_rng(0))
  # The left eye is the old right one mirrored, and the other way round; the nose stays.
  np.testing.assert_array_equal(ex["kp"], [[20 - 15, 5, 1], [20 - 3, 4, 1], [20 - 10, 8, 1]])
  twice = T.HFlip(p=1.0, fields=FACE).random_map(ex, np.random.default_rng(0))
  np.testing.assert_array_equal(twice["kp"], _face()["kp"])


def test_keypoints_follow_resize_and_crop_and_leave_the_image_invisible():
  ex = T.Resize(size=(20, 40), fields=FACE).random_map(_face(), np.random.default_rng(0))
  np.testing.assert_allclose(ex["kp"], [[6, 8, 1], [30, 10, 1], [20, 16, 1]])
  crop = T.crop_at(dict(ex), 12, 12, np.random.default_rng(1), as_fields(FACE))
  # Whatever the window, a point keeps its offset from it; those outside turn invisible.
  x0 = ex["kp"][0, 0] - crop["kp"][0, 0]
  y0 = ex["kp"][0, 1] - crop["kp"][0, 1]
  np.testing.assert_allclose(crop["kp"][:, :2], ex["kp"][:, :2] - [x0, y0])
  inside = ((crop["kp"][:, :2] >= 0) & (crop["kp"][:, :2] <= 12)).all(1)
  np.testing.assert_array_equal(crop["kp"][:, 2], inside.astype(np.float32))
  assert batching.pad_example(crop, FACE, (16, 16))["kp"].shape == (3, 3)


def test_dense_maps_interpolate_bilinearly_and_pad_with_their_fill():
  ramp = np.tile(np.arange(8, dtype=np.float32), (4, 1))  # 4 x 8, value = x
  ex = {"image": np.zeros((4, 8, 3), np.uint8), "index": np.int32(0),
        "orig_hw": np.int32([4, 8]), "depth": ramp}
  fields = {"depth": DenseMap(fill=float("nan"))}
  up = T.resize(ex, (4, 16), as_fields(fields))["depth"]
  # Bilinear: between two pixels, the value between theirs (nearest would repeat them).
  assert up.dtype == np.float32 and len(np.unique(up[0])) > 8
  # OpenCV's pixel centres: output x samples the input at (x + 0.5) / 2 - 0.5.
  np.testing.assert_allclose(up[0, 1:15], (np.arange(1, 15) + 0.5) / 2 - 0.5, atol=1e-6)
  pad = batching.pad_example(ex, fields, (6, 10))["depth"]
  np.testing.assert_array_equal(pad[:4, :8], ramp)
  assert np.isnan(pad[4:]).all() and np.isnan(pad[:, 8:]).all()
  # Not blendable: MixUp leaves an example with a dense map alone.
  src = [ex]
  same = T.MixUp(source=src, p=1.0, fields=fields).random_map(ex, np.random.default_rng(0))
  np.testing.assert_array_equal(same["depth"], ramp)


# ---------------------------------------------------------------- docs/data.md's example


def _docs_block(heading: str) -> str:
  text = (ROOT / "docs" / "data.md").read_text()
  section = text.split(heading, 1)[1].split("\n## ", 1)[0]
  return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


def test_the_docs_example_of_a_new_format_reads_through_the_pipeline(tmp_path, monkeypatch):
  from tbgc_jax.data import formats

  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  try:
    exec(compile(_docs_block("## Adding a format"), "docs/data.md", "exec"), scope)  # noqa: S102
    assert "csv_cls" in formats.format_names()
    assert scope["checked"] is True
  finally:
    if "csv_cls" in formats.format_names():
      formats.unregister_reader("csv_cls")
