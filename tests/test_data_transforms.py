"""Augmentations: boxes and label maps stay aligned with pixels; determinism; branches; the
plain / parallel / multi-branch modes; detection AutoAugment; RandomChoice and curriculum."""

import pickle

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbgc_jax.data import configs
from tbgc_jax.data import transforms as T
from tbgc_jax.data.augment import (
    AUGMENT_MODES,
    Chain,
    RandomChoice,
    branch_chains,
    build_augment,
    build_chain,
    parse_spec,
)
from tbgc_jax.data.fields import Boxes, ClassMap, ImageLabel, as_fields
from tbgc_jax.data.pipeline import TrainExample


def _det_example(h=60, w=80, boxes=((10, 12, 30, 40), (45, 5, 70, 25)), index=0):
  img = np.zeros((h, w, 3), np.uint8)
  for x0, y0, x1, y1 in boxes:
    img[y0:y1, x0:x1] = 255
  return {"image": img, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
          "labels": np.arange(len(boxes), dtype=np.int32), "index": np.int32(index),
          "orig_hw": np.int32([h, w]), "image_id": np.int32(index)}


# The fields of the detection and segmentation examples, by kind (as their data specs declare).
DET = {"boxes": Boxes(), "image_id": ImageLabel(fill=-1, show=False)}
SEG_MAPS = {"label": ClassMap()}


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


def _assert_boxes_cover_pixels(ex, border=0):
  """Every bright pixel lies inside some box (1 px slack); every box holds bright pixels.

  Bright pixels within ``border`` pixels of the image edge are exempt (what is left of a box
  cut to under 1 pixel by a crop, and therefore dropped, then resized).
  """
  bright = ex["image"].max(-1) > 127
  h, w = bright.shape
  if border:
    bright_inner = np.zeros_like(bright)
    bright_inner[border:h - border, border:w - border] = bright[border:h - border,
                                                                border:w - border]
    ys, xs = np.nonzero(bright_inner)
  else:
    ys, xs = np.nonzero(bright)
  cx, cy = xs + 0.5, ys + 0.5
  b = ex["boxes"]
  assert b.dtype == np.float32 and b.shape[1] == 4 and len(ex["labels"]) == len(b)
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
    T.MultiScale(long_edge=120, short_min=50, short_max=100, fields=DET),
    T.RandomResize(long_edge=100, ratio_min=0.5, ratio_max=2.0, fields=DET),
    T.Resize(size=(37, 91), fields=DET),
    T.ResizeFit(size=(64, 64), fields=DET),
    T.HFlip(p=1.0, fields=DET),
    T.Rotate(max_deg=30, p=1.0, fields=DET),
    T.RandomCrop(size=(30, 40), fields=DET),
    T.Mosaic(source=_Source("det"), size=(64, 96), fields=DET),
]


@pytest.mark.parametrize("t", DET_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_boxes_follow_pixels(t):
  for seed in range(12):
    ex = t.random_map(_det_example(), np.random.default_rng(seed))
    _assert_boxes_cover_pixels(ex)


@pytest.mark.parametrize("op", ["Rotate", "ShearX", "ShearY"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_autoaugment_geometric_ops_are_box_and_mask_aware(op, sign):
  ex = T._apply_op(_det_example(), op, T._magnitude(op, 9), sign, DET)
  _assert_boxes_cover_pixels(ex)
  ex = T._apply_op(_seg_example(), op, T._magnitude(op, 9), sign, SEG_MAPS)
  _assert_label_follows_pixels(ex)


def _assert_boxes_tight(ex, atol=1.0):
  """Each box's edges are within ``atol`` pixels of the painted pixels it holds."""
  bright = ex["image"].max(-1) > 127
  for x0, y0, x1, y1 in ex["boxes"]:
    ys, xs = np.nonzero(bright[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))])
    np.testing.assert_allclose([xs.min() + int(x0), ys.min() + int(y0)], [x0, y0], atol=atol)
    np.testing.assert_allclose([xs.max() + 1 + int(x0), ys.max() + 1 + int(y0)], [x1, y1],
                               atol=atol)


def test_axis_aligned_transforms_keep_boxes_tight():
  for t in (T.Resize(size=(120, 40), fields=DET), T.HFlip(p=1.0, fields=DET),
            T.RandomCrop(size=(50, 50), fields=DET)):
    _assert_boxes_tight(t.random_map(_det_example(), np.random.default_rng(1)))


def test_resized_boxes_stay_inside_the_image():
  for w in range(20, 100, 3):
    ex = _det_example(w, w, ((0, 0, w, w),))
    for ow in range(20, 100):
      b = T.resize(ex, (ow, ow), as_fields(DET))["boxes"]
      assert (b <= ow).all() and (b >= 0).all(), (w, ow, b)


def test_hflip_reference():
  ex = T.HFlip(p=1.0, fields=DET).random_map(_det_example(), np.random.default_rng(0))
  np.testing.assert_array_equal(ex["boxes"][0], [80 - 30, 12, 80 - 10, 40])
  np.testing.assert_array_equal(ex["image"], _det_example()["image"][:, ::-1])


SEG_TRANSFORMS = [
    T.RandomResize(long_edge=100, fields=SEG_MAPS),
    T.Rotate(max_deg=30, p=1.0, fields=SEG_MAPS),
    T.RandomCrop(size=(40, 40), fields=SEG_MAPS), T.HFlip(p=1.0, fields=SEG_MAPS),
    T.Mosaic(source=_Source("seg"), size=(96, 96), fields=SEG_MAPS),
    T.ResizeFit(size=(50, 50), fields=SEG_MAPS),
]


@pytest.mark.parametrize("t", SEG_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_label_maps_follow_pixels(t):
  for seed in range(8):
    ex = t.random_map(_seg_example(), np.random.default_rng(seed))
    _assert_label_follows_pixels(ex)


def test_rotate_fills_label_with_ignore():
  ex = T.Rotate(max_deg=45, p=1.0, fields=SEG_MAPS).random_map(_seg_example(),
                                                                   np.random.default_rng(3))
  assert (ex["label"][0, 0] == 255) and (ex["image"][0, 0] == 0).all()


def test_mosaic_canvas_and_mixup():
  src = _Source("det")
  ex = T.Mosaic(source=src, size=(64, 96)).random_map(_det_example(), np.random.default_rng(0))
  assert ex["image"].shape == (64, 96, 3) and ex["index"] == 0
  ex = T.Mosaic(source=_Source("seg"), size=(64, 96), fields=SEG_MAPS).random_map(
      _seg_example(), np.random.default_rng(0))
  assert ex["label"].shape == (64, 96) and (ex["label"] == 255).any()
  mix = T.MixUp(source=src, p=1.0, fields=DET).random_map(_det_example(),
                                                          np.random.default_rng(0))
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
                       "probs_start": [0.5, 0.5], "probs_end": [0.1, 0.9]}, _Source("det"),
                      fields=DET)
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
  with pytest.raises(ValueError, match="short_max = short_min"):
    build_chain("multiscale(short_min=480, short_max=600, step=32)")
  with pytest.raises(ValueError, match="at least one branch"):
    RandomChoice(())
  with pytest.raises(ValueError, match="augmentation mode must be one of"):
    build_augment({"mode": "chain", "plain": "hflip"})


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


# ---------------------------------------------------------------- augmentation modes


def _data(preset, mode):
  data = configs.tiny() if preset == "tiny" else configs.challenge()
  return configs.set_augment_mode(data, mode)


def _types(chain):
  return [type(t) for t in chain.transforms]


@pytest.mark.parametrize("preset", ["tiny", "challenge"])
def test_plain_mode_is_the_papers_section_3_augmentation(preset):
  data = _data(preset, "plain")
  augs = {task: build_augment(data[task].augment, _Source(task)) for task in data}
  assert all(isinstance(a, Chain) for a in augs.values())
  assert _types(augs["det"]) == [T.MultiScale, T.HFlip]
  assert _types(augs["seg"]) == [T.RandomResize, T.RandomCrop, T.HFlip, T.ColorDistort]
  assert _types(augs["cls"]) == [T.Resize, T.RandomErase, T.HFlip]
  rr = augs["seg"].transforms[0]
  assert (rr.ratio_min, rr.ratio_max) == (0.5, 2.0)
  assert augs["seg"].transforms[1].size == tuple(data.seg.image_size)
  ms, size = augs["det"].transforms[0], tuple(data.cls.image_size)
  assert augs["cls"].transforms[0].size == size
  if preset == "challenge":
    assert (ms.long_edge, ms.short_min, ms.short_max) == (608, 480, 608)
    assert size == (448, 448)
  else:
    assert ms.long_edge == max(data.det.image_size)


@pytest.mark.parametrize("preset", ["tiny", "challenge"])
@pytest.mark.parametrize("task", ["det", "seg", "cls"])
def test_parallel_is_exactly_the_union_of_the_branches(preset, task):
  src = _Source("seg" if task == "seg" else "det")
  par = build_augment(_data(preset, "parallel")[task].augment, src)
  branches = branch_chains(build_augment(_data(preset, "multi_branch")[task].augment, src))
  union = {t for b in branches for t in b.transforms}
  assert isinstance(par, Chain)
  assert len(set(par.transforms)) == len(par.transforms)
  assert set(par.transforms) == union
  if task == "seg":
    assert T.ColorDistort not in _types(par)  # no branch has it


def test_parallel_that_is_not_the_union_is_rejected():
  cfg = {"mode": "parallel", "branches": ["hflip|noise", "rotate|noise"]}
  with pytest.raises(ValueError, match=r"extra: \['ColorDistort'\], missing: \[\]"):
    build_augment({**cfg, "parallel": "rotate|hflip|noise|color_distort"})
  with pytest.raises(ValueError, match=r"missing: \['Rotate'\]"):
    build_augment({**cfg, "parallel": "hflip|noise"})
  with pytest.raises(ValueError, match="exactly once"):
    build_augment({**cfg, "parallel": "rotate|hflip|noise|hflip"})
  with pytest.raises(ValueError, match="needs a 'parallel' chain"):
    build_augment(cfg)
  assert _types(build_augment({**cfg, "parallel": "rotate|hflip|noise"})) == [
      T.Rotate, T.HFlip, T.GaussianNoise]


@pytest.mark.parametrize("preset", ["tiny", "challenge"])
def test_multi_branch_has_at_most_one_strong_augmentation_per_branch(preset):
  data = _data(preset, "multi_branch")
  for task in ("det", "seg"):
    aug = build_augment(data[task].augment, _Source(task))
    assert isinstance(aug, RandomChoice) and len(aug.branches) == 2
    assert [b.num_strong for b in aug.branches] in ([0, 1], [1, 1])
    assert T.Mosaic in _types(aug.branches[1])
  assert isinstance(build_augment(data.cls.augment), Chain)
  if preset == "challenge":  # Table 1: AutoAugment in detection's branch 1
    det = build_augment(data.det.augment, _Source("det"))
    assert _types(det.branches[0]) == [T.MultiScale, T.HFlip, T.DetAutoAugment,
                                       T.GaussianNoise]
    assert _types(det.branches[1]) == [T.Mosaic, T.MixUp, T.HFlip, T.GaussianNoise]


def test_trainer_modes_are_the_data_modes():
  assert AUGMENT_MODES == ("plain", "parallel", "multi_branch")
  with pytest.raises(ValueError, match="augmentation mode must be one of"):
    configs.set_augment_mode(configs.tiny(), "mixed")


# ---------------------------------------------------------------- detection AutoAugment


def test_autoaugment_names():
  det = build_chain("autoaugment").transforms[0]
  assert isinstance(det, T.DetAutoAugment) and det.strong
  assert isinstance(build_chain("imagenet_autoaugment").transforms[0], T.ImageNetAutoAugment)
  # The InternImage DINO numbers fitted to a 608 long edge.
  (ms,), (pre, crop, final) = det.policies
  assert ms == final and ms.long_edge == 608 and ms.shorts == (480, 512, 544, 576, 608)
  assert pre.long_edge == 4200 and pre.shorts == (400, 500, 600)
  assert isinstance(crop, T.RangeCrop) and (crop.min_size, crop.max_size) == (384, 600)


class _TaggedPolicies(T.DetAutoAugment):
  """Sub-policy k resizes to (k + 1) x (k + 1): the output shows which one ran."""

  @property
  def policies(self):
    return (T.Resize(size=(1, 1)),), (T.Resize(size=(2, 2)),)


def test_autoaugment_picks_its_two_sub_policies_uniformly():
  aug, n = _TaggedPolicies(), 2000
  rng = np.random.default_rng(0)
  ran = [aug.random_map(_det_example(), rng)["image"].shape[0] - 1 for _ in range(n)]
  assert abs(np.mean(ran) - 0.5) < 5 * np.sqrt(0.25 / n)


# Small sizes for small images: final short edges 48..80 by 16, pre-crop 50..70 by 10,
# crop sides in [32, 60].
SMALL_AA = T.DetAutoAugment(long_edge=96, short_min=48, short_max=80, step=16,
                            crop_long_edge=400, crop_short_min=50, crop_short_max=70,
                            crop_short_step=10, crop_min=32, crop_max=60, fields=DET)


@st.composite
def _grid_example(draw):
  """A det example with up to 4 painted, well separated boxes (one per quadrant)."""
  h, w = draw(st.integers(40, 90)), draw(st.integers(40, 90))
  boxes = []
  for qy in range(2):
    for qx in range(2):
      if not draw(st.booleans()):
        continue
      cy0, cy1 = qy * h // 2 + 3, (qy + 1) * h // 2 - 3
      cx0, cx1 = qx * w // 2 + 3, (qx + 1) * w // 2 - 3
      x0 = draw(st.integers(cx0, cx1 - 8))
      y0 = draw(st.integers(cy0, cy1 - 8))
      boxes.append((x0, y0, draw(st.integers(x0 + 8, cx1)), draw(st.integers(y0 + 8, cy1))))
  return _det_example(h, w, tuple(boxes))


@settings(max_examples=60, deadline=None)
@given(ex=_grid_example(), policy=st.integers(0, 1), seed=st.integers(0, 2**32 - 1))
def test_autoaugment_sub_policies_keep_boxes_inside_and_on_the_pixels(ex, policy, seed):
  out = SMALL_AA.apply_policy(dict(ex), policy, np.random.default_rng(seed))
  h, w = out["image"].shape[:2]
  final = SMALL_AA.policies[0][0]
  assert min(h, w) in final.shorts or max(h, w) == final.long_edge
  if len(ex["boxes"]):
    # A crop's 1-pixel sliver, resized by at most short_max / crop_min = 2.5.
    _assert_boxes_cover_pixels(out, border=3 if policy else 0)
    # Axis-aligned geometry only: each box stays tight around its painted pixels (two
    # resizes, each blurring an edge by up to a pixel).
    _assert_boxes_tight(out, atol=1.5)
  if policy == 0:  # resize only: every box survives, scaled with the image
    assert len(out["boxes"]) == len(ex["boxes"])
    s = np.float32([w / ex["image"].shape[1], h / ex["image"].shape[0]] * 2)
    np.testing.assert_allclose(out["boxes"], ex["boxes"] * s, rtol=1e-5)
  else:  # the crop keeps a box whenever there is one
    assert (len(out["boxes"]) > 0) == (len(ex["boxes"]) > 0)


def test_range_crop_sizes_and_fallback():
  crop = T.RangeCrop(min_size=20, max_size=30, fields=DET)
  sizes = {crop.random_map(_det_example(), np.random.default_rng(s))["image"].shape[:2]
           for s in range(200)}
  assert all(20 <= h <= 30 and 20 <= w <= 30 for h, w in sizes) and len(sizes) > 20
  # No crop of this size can hold a box of the example: it comes back uncropped.
  ex = _det_example(60, 80, ((0, 0, 2, 2),))
  out = T.RangeCrop(min_size=50, max_size=50, tries=3, fields=DET).random_map(
      ex, np.random.default_rng(0))
  assert out["image"].shape[:2] == (60, 80)
  np.testing.assert_array_equal(out["boxes"], ex["boxes"])


# ---------------------------------------------------------------- RandomChoice


def _tags(n):
  return [f"resize(size=({b + 1}, {b + 1}))" for b in range(n)]


def _branch_frequencies(aug, n, progress=0.0):
  counts = np.zeros(len(aug.branches))
  rng = np.random.default_rng(123)
  for _ in range(n):
    ex = aug.random_map({"image": np.zeros((4, 4, 3), np.uint8), "progress": progress}, rng)
    assert ex["image"].shape[0] == ex["branch"] + 1  # the chosen branch ran
    counts[ex["branch"]] += 1
  return counts / n


@pytest.mark.parametrize("probs", [None, (0.7, 0.2, 0.1)])
def test_random_choice_uniform_unless_configured(probs):
  cfg = {"mode": "multi_branch", "branches": _tags(3)}
  if probs:
    cfg["probs"] = probs
  aug = build_augment(cfg)
  p = np.asarray(probs or (1 / 3,) * 3)
  for progress in (0.0, 1.0):  # no curriculum: the same at any progress
    np.testing.assert_allclose(aug.probs(progress), p)
  n = 3000
  freq = _branch_frequencies(aug, n)
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize("preset", ["tiny", "challenge"])
def test_curriculum_off_by_default(preset):
  data = _data(preset, "multi_branch")
  for task in ("det", "seg"):
    assert not data[task].augment.curriculum
    aug = build_augment(data[task].augment, _Source(task))
    np.testing.assert_allclose(aug.probs(0.0), aug.probs(1.0))
  if preset == "challenge":  # and, unless configured, uniform
    np.testing.assert_allclose(build_augment(data.det.augment).probs(0.0), [0.5, 0.5])


def test_curriculum_when_on():
  data = _data("challenge", "multi_branch")
  data.det.augment.curriculum = True
  aug = build_augment(data.det.augment)
  np.testing.assert_allclose(aug.probs(0.0), configs.PROBS_START)
  np.testing.assert_allclose(aug.probs(1.0), configs.PROBS_END)
  with pytest.raises(ValueError, match="curriculum=True needs"):
    build_augment({"mode": "multi_branch", "branches": _tags(2), "curriculum": True})


def test_curriculum_follows_the_epochs_of_the_pipeline():
  cfg = {"mode": "multi_branch", "branches": _tags(2), "probs_start": (1.0, 0.0),
         "probs_end": (0.0, 1.0)}
  src = _Source("det")
  for curriculum in (False, True):
    aug = build_augment({**cfg, "curriculum": curriculum}, src)
    fns = [TrainExample(src, aug, "det", (8, 8), as_fields(DET), seed=seed, epoch_len=len(src),
                        num_epochs=4) for seed in range(60)]
    for epoch, progress in ((0, 0.0), (2, 0.5), (3, 0.75)):
      branch = [fn.example(epoch, i)["branch"] for fn in fns for i in range(len(src))]
      p1, n = (progress if curriculum else 0.5), len(branch)
      assert abs(np.mean(branch) - p1) <= 5 * np.sqrt(p1 * (1 - p1) / n), (epoch, p1)
