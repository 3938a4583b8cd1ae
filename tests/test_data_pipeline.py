"""grain pipelines on the embedded data: batch interface, determinism, checkpoint restore."""

import logging
import os

import numpy as np
import pytest

from tbgc_jax.data import configs, embedded, pipeline
from tbgc_jax.tasks import get_task

DATA = {t: get_task(t).data for t in ("det", "seg", "cls")}


@pytest.fixture(scope="module")
def data_cfg(embedded_root):
  root = embedded_root
  cfg = configs.tiny()
  for task in ("det", "seg", "cls"):
    cfg[task].source.root = root
  return cfg


def _eq(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


COMMON = {"image": np.uint8, "image_mask": bool, "image_hw": np.int32, "orig_hw": np.int32,
          "index": np.int32, "valid": bool}


@pytest.mark.parametrize("task", ["det", "seg", "cls"])
def test_batch_interface(data_cfg, task):
  cfg = data_cfg[task]
  ds = pipeline.train_dataset(cfg, DATA[task], seed=1, num_epochs=1, batch_size=3)
  src = pipeline.make_source(cfg, DATA[task], "train")
  assert len(ds) == len(src) // 3
  H, W = cfg.image_size
  for b in (ds[0], ds[len(ds) - 1]):
    for k, dt in COMMON.items():
      assert b[k].dtype == dt, k
    assert b["image"].shape == (3, H, W, 3) and b["image_mask"].shape == (3, H, W)
    assert b["valid"].all()
    for i in range(3):
      h, w = b["image_hw"][i]
      assert 0 < h <= H and 0 < w <= W
      assert b["image_mask"][i, :h, :w].all() and b["image_mask"][i].sum() == h * w
      assert not b["image"][i][~b["image_mask"][i]].any()  # zero padding
    if task == "det":
      N = cfg.max_boxes
      assert b["boxes"].shape == (3, N, 4) and b["labels"].shape == (3, N)
      assert b["box_mask"].dtype == bool and b["image_id"].dtype == np.int32
      for i in range(3):
        bx = b["boxes"][i][b["box_mask"][i]]
        h, w = b["image_hw"][i]
        assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 2] <= w).all() and (bx[:, 3] <= h).all()
        assert not b["boxes"][i][~b["box_mask"][i]].any()
        assert ((b["labels"][i] >= 0) & (b["labels"][i] < cfg.num_classes)).all()
    elif task == "seg":
      assert b["label"].shape == (3, H, W) and b["label"].dtype == np.uint8
      assert (b["label"][~b["image_mask"]] == 255).all()
      vals = np.unique(b["label"])
      assert ((vals < cfg.num_classes) | (vals == 255)).all()
    else:
      assert b["label"].shape == (3,) and b["label"].dtype == np.int32


def test_box_overflow_counted_and_logged(data_cfg, caplog):
  cfg = data_cfg.det
  cfg.max_boxes = 1
  with caplog.at_level(logging.WARNING):
    src = pipeline.make_source(cfg, DATA["det"], "train")
    ds = pipeline.train_dataset(cfg, DATA["det"], seed=0, num_epochs=1, source=src)
    b = ds[0]
  assert b["boxes"].shape[1] == 1 and b["box_mask"].all()
  assert "more than max_boxes=1" in caplog.text and "num_dropped_boxes" in caplog.text
  # Each example counts the boxes it dropped in a batch field (nothing is lost in grain's
  # worker processes): every box of the augmented example but the one slot.
  fn = pipeline.TrainExample(src, pipeline.augmentation(cfg, DATA["det"], src), "det",
                             tuple(cfg.image_size), pipeline.fields(cfg, DATA["det"]), seed=0,
                             epoch_len=len(src), num_epochs=1)
  counts = [(int(fn.map((0, r))["num_dropped_boxes"]), len(fn.example(0, r)["boxes"]))
            for r in range(6)]
  assert all(d == max(0, n - 1) for d, n in counts) and sum(d for d, _ in counts) > 0, counts
  assert b["num_dropped_boxes"].dtype == np.int32 and b["num_dropped_boxes"].sum() > 0
  cfg.max_boxes = 24


def test_same_seed_epoch_index_same_sample(data_cfg):
  cfg = data_cfg.det
  src = pipeline.make_source(cfg, DATA["det"], "train")
  a = pipeline.train_dataset(cfg, DATA["det"], seed=5, num_epochs=3, batch_size=2, source=src)
  b = pipeline.train_dataset(cfg, DATA["det"], seed=5, num_epochs=3, batch_size=4, source=src)
  n = len(src)
  # Collect (epoch, record) -> example from both batchings of epoch 1 and compare.
  seen = {}
  for ds, bs in ((a, 2), (b, 4)):
    for j in range(n // bs, n // bs + 6):
      batch = ds[j]
      for i in range(bs):
        key = ((j * bs + i) // n, int(batch["index"][i]))
        ex = {k: v[i] for k, v in batch.items()}
        if key in seen:
          _eq(seen[key], ex)
        seen[key] = ex
  # Epochs reshuffle and re-augment.
  first = [int(r) for j in range(4) for r in a[j]["index"]]
  second = [int(r) for j in range(n // 2, n // 2 + 4) for r in a[j]["index"]]
  assert first != second
  c = pipeline.train_dataset(cfg, DATA["det"], seed=6, num_epochs=1, batch_size=2, source=src)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_restore_matches_uninterrupted(data_cfg, workers):
  cfg = data_cfg.cls
  kw = dict(seed=3, num_epochs=2, batch_size=8, read_threads=2)
  # Uninterrupted reference, in-process (worker processes must give the same batches).
  it = pipeline.train_iterator(cfg, DATA["cls"], num_workers=0, **kw)
  ref = [next(it) for _ in range(16)]  # crosses the epoch boundary (12 full batches/epoch)
  it = pipeline.train_iterator(cfg, DATA["cls"], num_workers=workers, **kw)
  for j in range(5):
    _eq(ref[j], next(it))
  state = it.get_state()
  del it
  it2 = pipeline.train_iterator(cfg, DATA["cls"], num_workers=workers, **kw)
  it2.set_state(state)
  for j in range(5, 16):
    _eq(ref[j], next(it2))


@pytest.mark.parametrize("task", ["det", "seg", "cls"])
def test_eval_pipeline(data_cfg, task):
  cfg = data_cfg[task]
  src = pipeline.make_source(cfg, DATA[task], "val")
  ds = pipeline.eval_dataset(cfg, DATA[task], batch_size=7, source=src)
  n = len(src)
  assert len(ds) == -(-n // 7)
  batches = list(pipeline.eval_iterator(cfg, DATA[task], batch_size=7, source=src))
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert valid[:n].all() and not valid[n:].any() and len(valid) == len(ds) * 7
  np.testing.assert_array_equal(index[:n], np.arange(n))
  last = batches[-1]
  assert not last["image"][~last["valid"]].any()
  _eq(batches[0], ds[0])  # deterministic
  H, W = cfg.eval_image_size
  assert batches[0]["image"].shape == (7, H, W, 3)


def test_embedded_generation_is_deterministic(data_cfg, tmp_path):
  root = str(tmp_path / "again")
  embedded.generate(root, (DATA["det"], DATA["cls"]))  # per-task rngs: a subset is identical
  ref = data_cfg.det.source.root
  for rel in ("det/annotations/instances_val.json", "cls/val.txt", "cls/images/val_00011.jpg",
              "det/images/train/train_00007.jpg"):
    with open(os.path.join(root, rel), "rb") as f, open(os.path.join(ref, rel), "rb") as g:
      assert f.read() == g.read(), rel
  assert embedded.embedded_dir().endswith(embedded.VERSION) or os.environ.get("TBGC_DATA_DIR")


def test_hosts_split_the_same_global_batches(data_cfg):
  """Host k's batch j is its slice of global batch j, whatever the number of hosts."""
  cfg = data_cfg.cls
  src = pipeline.make_source(cfg, DATA["cls"], "train")
  one_host = pipeline.train_dataset(cfg, DATA["cls"], seed=0, num_epochs=1, batch_size=6,
                                    source=src)
  shards = [pipeline.train_dataset(cfg, DATA["cls"], seed=0, num_epochs=1, batch_size=2,
                                   shard_index=k, shard_count=3, source=src) for k in range(3)]
  assert all(len(ds) == len(one_host) for ds in shards)
  for j in (0, len(one_host) - 1):
    for key, want in one_host[j].items():
      got = np.concatenate([ds[j][key] for ds in shards])
      np.testing.assert_array_equal(got, want, err_msg=key)
  seen = np.concatenate([ds[j]["index"] for ds in shards for j in range(len(ds))])
  assert len(set(seen.tolist())) == len(seen) == len(one_host) * 6
