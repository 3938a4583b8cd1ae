"""A fourth task defined only here, through the task interface (``tbgc_jax.tasks``): counting
the digits of the embedded detection scenes. It trains and evaluates with det, seg and cls
through ``train_and_evaluate`` (evaluating during training too), nothing under tbgc_jax/
knows of it. Also: a source format registered here, a task's own embedded data, an evaluator
named by the config, the registry's errors."""

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.data import Boxes, DataSpec, RecordSet, embedded, pipeline
from tbgc_jax.data.formats import get_reader, register_reader, unregister_reader
from tbgc_jax.tasks import TaskSpec, get_task, register_task, task_names, unregister_task
from tbgc_jax.tasks.detection import DetectionData
from tbgc_jax.trainer.evaluate import task_metrics
from tbgc_jax.trainer.setup import validate_config
from tbgc_jax.trainer.train import train_and_evaluate
from tests import micro_config

TRAIN_SCENES = 8  # one batch: every step sees the same scenes, so the loss can only go down


class CountHead(nnx.Module):
  """Mean-pooled, normalised last backbone level -> one number: how many objects the image
  holds. It starts at 0 for every image (zero kernel), so its first steps move the
  prediction towards the mean count whatever the backbone does."""

  def __init__(self, channels, *, rngs):
    self.norm = nnx.LayerNorm(channels[-1], use_scale=False, use_bias=False, rngs=rngs)
    self.fc = nnx.Linear(channels[-1], 1, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def _count(self, features):
    return self.fc(self.norm(features[-1].mean(axis=(1, 2))))[:, 0]

  def loss(self, features, batch, rng):
    del rng
    valid = batch["valid"]
    count = batch["box_mask"].sum(-1).astype(jnp.float32)  # the boxes left after augmentation
    err = jnp.where(valid, (self._count(features) - count) ** 2, 0.0)
    loss = err.sum() / jnp.maximum(valid.sum(), 1)
    return loss, {"count_mse": loss}

  def predict(self, features, batch):
    del batch
    return {"count": self._count(features)}


class CountEvaluator:
  """Mean absolute error of the count and the fraction of images counted exactly."""

  def __init__(self, ctx):
    del ctx
    self.abs_err, self.exact, self.n = 0.0, 0, 0

  def update(self, batch, predictions):
    valid = np.asarray(batch["valid"], bool)
    pred, true = np.asarray(predictions["count"])[valid], batch["box_mask"].sum(-1)[valid]
    self.abs_err += float(np.abs(pred - true).sum())
    self.exact += int((np.round(pred) == true).sum())
    self.n += int(valid.sum())

  def compute(self):
    return {"exact": self.exact / self.n, "mae": self.abs_err / self.n}


def read_first_coco(kwargs, ctx):
  """The ``coco_first`` format: a COCO file's first ``limit`` images."""
  kwargs = dict(kwargs)
  limit = kwargs.pop("limit")
  return RecordSet(get_reader("coco")(kwargs, ctx).records[:limit])


class CountData(DataSpec):
  """The detection scenes (their records, boxes kept through the augmentations, padded to
  ``max_boxes`` slots): the target is the number of boxes left after augmentation."""

  name = "count"
  formats = ("coco_first",)
  embedded_format = "coco_first"

  def fields(self, task_cfg):
    return {"boxes": Boxes(max_boxes=int(task_cfg["max_boxes"]))}

  def decode(self, record, image, orig_hw, num_classes):
    ex = DetectionData().decode(record, image, orig_hw, num_classes)
    return {"boxes": ex["boxes"], "labels": ex["labels"]}

  def embedded_requires(self):
    return (DetectionData(),)  # reads the detection task's embedded data

  def embedded_reader_args(self, root, split):
    limit = TRAIN_SCENES if split == "train" else 16
    return {**DetectionData().embedded_reader_args(root, split), "limit": limit}


class CountTask(TaskSpec):
  name = "count"
  data = CountData()
  metric = "exact"

  def build_head(self, config, channels, *, rngs):
    return CountHead(channels, rngs=rngs)

  def evaluator(self, ctx):
    return CountEvaluator(ctx)


@pytest.fixture
def count_task():
  register_reader("coco_first", read_first_coco)
  spec = register_task(CountTask())
  yield spec
  unregister_task(spec.name)
  unregister_reader("coco_first")


def _config():
  c = micro_config.get_config("det,seg,cls")
  c.tasks = ("det", "seg", "cls", "count")
  c.data.count = ml_collections.ConfigDict({
      "source": {"format": "embedded", "root": c.data.det.source.root, "train": {}, "val": {}},
      "policy": "strict", "deep_check": False, "allow_outside_root": False, "num_classes": 10,
      "batch_size": TRAIN_SCENES, "image_size": (32, 40), "eval_image_size": (32, 40),
      "max_boxes": 8,
      "augment": {"mode": "plain", "plain": "resize_fit(size=(32, 40))"},
      "eval_augment": "resize_fit(size=(32, 40))"})
  c.loss_weights.count = 1.0
  c.optim.lr = 1e-2
  c.optim.warmup_epochs = 0.0
  c.total_steps = 4
  c.checkpoint_every = 4
  c.eval_every = 2
  return c


# Same micro det/seg/cls model as the other e2e test of this group: one worker runs both, the
# second finds the per-task gradient executables in the compilation cache.
@pytest.mark.slow
@pytest.mark.xdist_group("micro_det_seg_cls")
def test_a_fourth_task_trains_and_evaluates_with_the_others(tmp_path, count_task):
  config = _config()
  assert "count" in task_names()
  metrics = train_and_evaluate(config, str(tmp_path))

  assert set(metrics) == {"det/mAP50", "det/mAP50_agnostic", "seg/mIoU", "cls/top1",
                          "count/exact", "count/mae", "score"}
  assert 0.0 <= metrics["count/exact"] <= 1.0 and np.isfinite(metrics["count/mae"])
  np.testing.assert_allclose(metrics["score"], np.mean(
      [metrics[k] for k in ("det/mAP50", "seg/mIoU", "cls/top1", "count/exact")]))
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  train = [r for r in rows if "count/loss" in r]
  assert [r["step"] for r in train] == [0, 1, 2, 3]
  losses = [r["count/loss"] for r in train]
  assert np.isfinite(losses).all() and all(np.diff(losses) < 0), losses
  # Evaluated during training every 2 steps (after steps 1 and 3), logged with the training
  # rows; the end of the run reports the last of them.
  val = [r for r in rows if "val/count/mae" in r]
  assert [r["step"] for r in val] == [1, 3]
  assert {k for k in val[-1] if k != "step"} == {f"val/{k}" for k in metrics}
  for k, v in metrics.items():
    np.testing.assert_allclose(val[-1][f"val/{k}"], v, err_msg=k)
  saved = json.load(open(tmp_path / "eval_metrics.json"))
  assert saved["step"] == 4 and saved["count/mae"] == metrics["count/mae"]


def read_dots_list(kwargs, ctx):
  del ctx
  with open(kwargs["list_file"]) as f:
    return RecordSet([tuple(int(v) for v in line.split()) for line in f])


class DotsData(DataSpec):
  """A task with embedded data of its own: a list file of scenes and their dot counts."""

  name = "dots"
  formats = ("dots_list",)
  embedded_format = "dots_list"
  embedded_data = True

  def embedded_reader_args(self, root, split):
    return {"list_file": os.path.join(root, "dots", f"{split}.txt")}

  def write_embedded(self, root, split, rng, pool):
    os.makedirs(os.path.join(root, "dots"), exist_ok=True)
    with open(os.path.join(root, "dots", f"{split}.txt"), "w") as f:
      f.writelines(f"{i} {int(rng.integers(1, 5))}\n" for i in range(4))


def test_a_task_writes_its_own_embedded_data_once(tmp_path):
  spec = DotsData()
  register_reader("dots_list", read_dots_list)
  try:
    root = str(tmp_path / "emb")
    cfg = {"source": {"format": "embedded", "root": root}, "num_classes": 1}
    records = pipeline.make_source(cfg, spec, "train").records
    assert len(records) == 4 and all(1 <= n < 5 for _, n in records)
    assert sorted(os.listdir(root)) == [".lock", "dots"]  # only what the task reads
    path = os.path.join(root, "dots", "val.txt")
    first = open(path).read()
    os.utime(path, (0, 0))
    embedded.reader_args(spec, "val", root)  # already there: not written again
    assert os.stat(path).st_mtime == 0 and open(path).read() == first
    with pytest.raises(ValueError, match="source format 'coco' is not available for task "
                                         "'dots'"):
      pipeline.make_source({**cfg, "source": {"format": "coco", "train": {}}}, spec, "train")
    with pytest.raises(ValueError, match="unknown source format 'dots_lst'; registered "
                                         "formats: .*'dots_list'"):
      pipeline.make_source({**cfg, "source": {"format": "dots_lst", "train": {}}},
                           type("Typo", (DotsData,), {"formats": ("dots_lst",)})(), "train")
  finally:
    unregister_reader("dots_list")


class _AlwaysHalf:
  def __init__(self, ctx):
    self.split = ctx.split

  def update(self, batch, predictions):
    pass

  def compute(self):
    return {"top1": 0.5, "split_is_val": float(self.split == "val")}


def always_half(ctx):
  return _AlwaysHalf(ctx)


def test_the_config_can_name_another_evaluator():
  config = micro_config.get_config("cls")
  config.data.cls.evaluator = f"{__name__}:always_half"
  predict = lambda batch: {"label": np.zeros(len(batch["label"]), np.int32)}
  assert task_metrics(config, "cls", predict) == {"top1": 0.5, "split_is_val": 1.0}
  config.data.cls.evaluator = f"{__name__}:no_such_factory"
  with pytest.raises(ValueError, match="config.data.cls.evaluator: expected"):
    task_metrics(config, "cls", predict)


def test_registry_errors(count_task):
  # The built-in tasks come first whichever of their modules was imported first.
  assert task_names() == ("det", "seg", "cls", "count")
  with pytest.raises(ValueError, match="already registered"):
    register_task(CountTask())
  with pytest.raises(ValueError, match="no headline metric"):
    register_task(type("NoMetric", (TaskSpec,), {"name": "nometric"})())
  with pytest.raises(ValueError, match="needs a DataSpec named 'other'"):
    register_task(type("Other", (CountTask,), {"name": "other"})())
  with pytest.raises(ValueError, match=r"unknown task 'counts'; registered tasks: \('det', "
                                       r"'seg', 'cls', 'count'\)"):
    get_task("counts")
  config = _config()
  validate_config(config)  # a registered task is a valid config.tasks entry
  unregister_task("count")
  with pytest.raises(ValueError, match="config.tasks must be distinct names among the "
                                       "registered tasks"):
    validate_config(config)
  register_task(count_task)  # for the fixture's clean-up
