"""Augmentations: boxes and label maps stay aligned with pixels; determinism; branches."""

import pickle

import cv2
import numpy as np
import pytest

from tbgc_jax.data import transforms as T
from tbgc_jax.data.augment import RandomChoice, build_augment, build_chain, parse_spec


def _det_example(h=60, w=80, boxes=((10, 12, 30, 40), (45, 5, 70, 25)), index=0):
  img = np.zeros((h, w, 3), np.uint8)
  for x0, y0, x1, y1 in boxes:
    img[y0:y1, x0:x1] = 255
  return {"image": img, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
          "labels": np.arange(len(boxes), dtype=np.int32), "index": np.int32(index),
          "orig_hw": np.int32([h, w]), "image_id": np.int32(index)}


def _seg_example(h=60, w=80, index=0):
  img = np.zeros((h, w, 3), np.uint8)
  lab = np.zeros((h, w), np.uint8)
  img[10:35, 15:50] = 200
  lab[10:35, 15:50] = 3
  lab[50:, :] = 255
  return {"image": img, "label": lab, "index": np.int32(index), "orig_hw": np.int32([h, w])}


class _Source:
  """Random-access source of painted examples (for Mosaic / MixUp)."""

  def __init__(self, kind):
    self.kind = kind

  def __len__(self):
    return 5

  def __getitem__(self, i):
    if self.kind == "det":
      return _det_example(40 + 5 * i, 50 + 7 * i, ((3 + i, 4, 20 + i, 30),), index=i)
    return _seg_example(50 + 3 * i, 70 + 2 * i, index=i)


def _assert_boxes_cover_pixels(ex):
  """Every bright pixel lies inside some box (1 px slack); every box holds bright pixels."""
  bright = ex["image"].max(-1) > 127
  ys, xs = np.nonzero(bright)
  cx, cy = xs + 0.5, ys + 0.5
  b = ex["boxes"]
  assert b.dtype == np.float32 and b.shape[1] == 4 and len(ex["labels"]) == len(b)
  h, w = ex["image"].shape[:2]
  assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
  assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
  assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()
  inside = ((cx[:, None] >= b[None, :, 0] - 1) & (cx[:, None] <= b[None, :, 2] + 1)
            & (cy[:, None] >= b[None, :, 1] - 1) & (cy[:, None] <= b[None, :, 3] + 1))
  assert inside.any(1).all(), "a painted pixel fell outside every transformed box"
  for x0, y0, x1, y1 in b:
    assert bright[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))].any(), (x0, y0, x1, y1)


def _assert_label_follows_pixels(ex, max_bad=0.01):
  """Away from region borders (1 px), label 3 has bright pixels and label 0 dark ones."""
  img, lab = ex["image"].max(-1), ex["label"]
  assert lab.shape == img.shape and lab.dtype == np.uint8
  k = np.ones((3, 3), np.uint8)
  fg = cv2.erode((lab == 3).astype(np.uint8), k).astype(bool)
  bg = cv2.erode((lab == 0).astype(np.uint8), k).astype(bool)
  if fg.sum() > 20:
    assert (img[fg] < 100).mean() <= max_bad
  if bg.sum() > 20:
    assert (img[bg] > 100).mean() <= max_bad


DET_TRANSFORMS = [
    T.MultiScale(long_edge=120, short_min=50, short_max=100),
    T.RandomResize(long_edge=100, ratio_min=0.5, ratio_max=2.0),
    T.Resize(size=(37, 91)),
    T.ResizeFit(size=(64, 64)),
    T.HFlip(p=1.0),
    T.Rotate(max_deg=30, p=1.0),
    T.RandomCrop(size=(30, 40)),
    T.Mosaic(source=_Source("det"), size=(64, 96)),
]


@pytest.mark.parametrize("t", DET_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_boxes_follow_pixels(t):
  for seed in range(12):
    ex = t.random_map(_det_example(), np.random.default_rng(seed))
    _assert_boxes_cover_pixels(ex)


@pytest.mark.parametrize("op", ["Rotate", "ShearX", "ShearY"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_autoaugment_geometric_ops_are_box_and_mask_aware(op, sign):
  ex = T._apply_op(_det_example(), op, T._magnitude(op, 9), sign)
  _assert_boxes_cover_pixels(ex)
  ex = T._apply_op(_seg_example(), op, T._magnitude(op, 9), sign)
  _assert_label_follows_pixels(ex)


def test_axis_aligned_transforms_keep_boxes_tight():
  for t in (T.Resize(size=(120, 40)), T.HFlip(p=1.0), T.RandomCrop(size=(50, 50))):
    ex = t.random_map(_det_example(), np.random.default_rng(1))
    bright = ex["image"].max(-1) > 127
    for x0, y0, x1, y1 in ex["boxes"]:
      ys, xs = np.nonzero(bright[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))])
      np.testing.assert_allclose([xs.min() + int(x0), ys.min() + int(y0)], [x0, y0], atol=1)
      np.testing.assert_allclose([xs.max() + 1 + int(x0), ys.max() + 1 + int(y0)], [x1, y1],
                                 atol=1)


def test_hflip_reference():
  ex = T.HFlip(p=1.0).random_map(_det_example(), np.random.default_rng(0))
  np.testing.assert_array_equal(ex["boxes"][0], [80 - 30, 12, 80 - 10, 40])
  np.testing.assert_array_equal(ex["image"], _det_example()["image"][:, ::-1])


SEG_TRANSFORMS = [
    T.RandomResize(long_edge=100), T.Rotate(max_deg=30, p=1.0), T.RandomCrop(size=(40, 40)),
    T.HFlip(p=1.0), T.Mosaic(source=_Source("seg"), size=(96, 96)),
    T.ResizeFit(size=(50, 50)),
]


@pytest.mark.parametrize("t", SEG_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_label_maps_follow_pixels(t):
  for seed in range(8):
    ex = t.random_map(_seg_example(), np.random.default_rng(seed))
    _assert_label_follows_pixels(ex)


def test_rotate_fills_label_with_ignore():
  ex = T.Rotate(max_deg=45, p=1.0).random_map(_seg_example(), np.random.default_rng(3))
  assert (ex["label"][0, 0] == 255) and (ex["image"][0, 0] == 0).all()


def test_mosaic_canvas_and_mixup():
  src = _Source("det")
  ex = T.Mosaic(source=src, size=(64, 96)).random_map(_det_example(), np.random.default_rng(0))
  assert ex["image"].shape == (64, 96, 3) and ex["index"] == 0
  ex = T.Mosaic(source=_Source("seg"), size=(64, 96)).random_map(
      _seg_example(), np.random.default_rng(0))
  assert ex["label"].shape == (64, 96) and (ex["label"] == 255).any()
  mix = T.MixUp(source=src, p=1.0).random_map(_det_example(), np.random.default_rng(0))
  assert len(mix["boxes"]) == 3  # 2 own + 1 from the other image
  assert mix["image"].shape == (60, 80, 3)
  np.testing.assert_array_equal(mix["labels"][:2], [0, 1])


def test_photometric_leave_annotations():
  for t in (T.ColorDistort(p=1.0), T.GaussianNoise(p=1.0), T.RandomErase(p=1.0)):
    ex0 = _det_example()
    ex = t.random_map(ex0, np.random.default_rng(0))
    np.testing.assert_array_equal(ex["boxes"], ex0["boxes"])
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == ex0["image"].shape
    assert not np.array_equal(ex["image"], ex0["image"])


def test_deterministic_given_rng_and_picklable():
  aug = build_augment({"mode": "multi_branch",
                       "branches": ["multiscale(long_edge=64, short_min=40, short_max=60)|hflip"
                                    "|autoaugment|noise", "mosaic(size=(64, 64))|mixup|hflip"],
                       "probs_start": [0.5, 0.5], "probs_end": [0.1, 0.9]}, _Source("det"))
  aug2 = pickle.loads(pickle.dumps(aug))
  for seed in range(6):
    a = aug.random_map(_det_example(), np.random.default_rng(seed))
    b = aug2.random_map(_det_example(), np.random.default_rng(seed))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_random_choice_curriculum_frequencies():
  tag = lambda b: build_chain(f"resize(size=({b + 1}, {b + 1}))")
  rc = RandomChoice((tag(0), tag(1), tag(2)), (0.6, 0.3, 0.1), (0.0, 0.2, 0.8))
  np.testing.assert_allclose(rc.probs(0.5), [0.3, 0.25, 0.45])
  np.testing.assert_allclose(rc.probs(2.0), [0.0, 0.2, 0.8])
  n = 3000
  for progress, p in ((0.0, rc.probs(0.0)), (0.75, rc.probs(0.75))):
    counts = np.zeros(3)
    for s in range(n):
      ex = rc.random_map({"image": np.zeros((4, 4, 3), np.uint8), "progress": progress},
                         np.random.default_rng(s))
      assert ex["image"].shape[0] == ex["branch"] + 1  # the chosen branch ran
      counts[ex["branch"]] += 1
    # 5 standard deviations of a binomial: fails only if probabilities are wrong.
    np.testing.assert_array_less(np.abs(counts / n - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-9)


def test_config_errors():
  with pytest.raises(ValueError, match="unknown transform 'flipp'"):
    parse_spec("hflip|flipp")
  with pytest.raises(ValueError, match="unknown argument"):
    build_chain("hflip(q=1)")
  with pytest.raises(ValueError, match="at most 1"):
    build_augment({"mode": "multi_branch", "branches": ["mosaic|autoaugment", "hflip"],
                   "probs_start": [0.5, 0.5]})
  with pytest.raises(ValueError, match="summing to 1"):
    build_augment({"mode": "multi_branch", "branches": ["hflip", "noise"],
                   "probs_start": [0.5, 0.6]})


@pytest.mark.parametrize("preset", ["tiny", "challenge", "parallel"])
def test_presets_build(preset):
  from tbgc_jax.data import configs

  data = configs.tiny() if preset == "tiny" else configs.challenge()
  if preset == "parallel":
    data = configs.use_parallel_baseline(data)
  assert data.det.image_size == ((608, 608) if preset != "tiny" else (160, 192))
  for task in ("det", "seg", "cls"):
    aug = build_augment(data[task].augment, _Source("det"))
    want = RandomChoice if (task != "cls" and preset != "parallel") else type(build_chain(""))
    assert isinstance(aug, want)
    build_chain(data[task].eval_augment)
  if preset == "challenge":
    assert (data.det.batch_size, data.seg.batch_size, data.cls.batch_size) == (2, 2, 8)
    ms = build_augment(data.det.augment).branches[0].transforms[0]
    assert (ms.long_edge, ms.short_min, ms.short_max) == (608, 480, 608)
    rr = build_augment(data.seg.augment).branches[0].transforms[0]
    assert (rr.ratio_min, rr.ratio_max) == (0.5, 2.0)
