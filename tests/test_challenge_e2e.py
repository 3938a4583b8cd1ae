"""The challenge config end to end on tiny datasets in the real formats: train.py, then eval.py,
whose submission is scored as the challenge would score it.

Same heads, readers, augmentation (Table 1 branches at the challenge's sizes) and evaluation
code as configs/challenge.py; only the sizes are overridden (tests/challenge_smoke_config.py;
docs/trainer.md, "CPU smoke run").
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests import real_format_data as rfd
from tests.test_challenge_eval import _pycocotools_map50

ROOT = Path(__file__).resolve().parents[1]
# 45 categories with sparse ids, as a converted TT100K file may number them.
CATEGORIES = [(10 + 7 * i, f"sign{i}") for i in range(45)]


def _det_images(split, n):
  rng = np.random.default_rng(len(split))
  images = []
  for i in range(n):
    anns = []
    for _ in range(int(rng.integers(1, 4))):
      x, y = rng.integers(0, 40, 2)
      w, h = rng.integers(8, 20, 2)
      anns.append((CATEGORIES[int(rng.integers(0, 4))][0], [int(x), int(y), int(w), int(h)], 0))
    anns.append((CATEGORIES[0][0], [60, 40, 10, 10], 1))  # a crowd region
    images.append({"id": 1000 * (i + 1) + 7, "file_name": f"{split}{i}.jpg", "hw": (64, 80),
                   "anns": anns})
  return images


def _write_data(base):
  det, seg, cls = (os.path.join(base, d) for d in ("tt100k", "bdd100k", "cars"))
  for split, n in (("train", 4), ("val", 3)):
    rfd.write_coco(det, split, _det_images(split, n), CATEGORIES)
    rfd.write_bdd100k_seg(seg, split, {
        f"{split}{i}": rfd.label_with_halves((48, 80), thin_row=5 + 2 * i) for i in range(n)})
  rfd.write_cls_list(cls, "train", [(f"t{i}.jpg", (7 * i) % 196) for i in range(8)])
  val = rfd.write_cls_list(cls, "val", [(f"v{i}.jpg", 3 * i) for i in range(3)])
  return det, seg, cls, val


def _run(script, args, env):
  result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def _decode_polygons(polygons: dict, hw) -> np.ndarray:
  """Paints each class's polygons, larger first (an enclosed region is always smaller)."""
  regions = [(cv2.contourArea(np.asarray(p, np.int32).reshape(-1, 1, 2)), int(c), p)
             for c, polys in polygons.items() for p in polys]
  out = np.full(hw, 255, np.uint8)
  for _, c, p in sorted(regions, key=lambda r: -r[0]):
    cv2.fillPoly(out, [np.asarray(p, np.int32).reshape(-1, 2)], c)
  return out


@pytest.mark.slow
def test_challenge_config_trains_evaluates_and_submits(tmp_path):
  det, seg, cls, val_list = _write_data(str(tmp_path / "data"))
  workdir = str(tmp_path / "run")
  config = [f"--config={ROOT / 'tests' / 'challenge_smoke_config.py'}:{det},{seg},{cls}"]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  _run("train.py", [*config, f"--workdir={workdir}"], env)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))

  submission, png_dir = tmp_path / "submission.json", tmp_path / "seg_pred"
  out = _run("eval.py", [*config, f"--workdir={workdir}", f"--submission={submission}",
                         f"--seg_png_dir={png_dir}"], env)
  printed = {k: float(v) / 100 for k, v in re.findall(r"^(\S+)\s+([\d.]+)$", out, re.M)}
  reported = json.load(open(os.path.join(workdir, "eval_metrics_2.json")))
  sub = json.load(open(submission))

  # dec: the challenge's scoring (pycocotools against the original file) gives the number
  # eval.py reported and printed.
  ann_file = os.path.join(det, "annotations", "instances_val.json")
  assert sub["dec"], "no detections exported"
  assert {d["category_id"] for d in sub["dec"]} <= {c for c, _ in CATEGORIES}
  assert {d["image_id"] for d in sub["dec"]} == {1007, 2007, 3007}
  scored = _pycocotools_map50(ann_file, sub["dec"])
  assert reported["det/mAP50"] == pytest.approx(scored, abs=1e-12)
  assert printed["det/mAP50"] == pytest.approx(scored, abs=5e-5)

  # seg: the polygons, at the original size, decode to the predicted label maps.
  assert sorted(sub["seg"]) == [f"val{i}.jpg" for i in range(3)]
  for i in range(3):
    pred = cv2.imread(str(png_dir / f"val{i}.png"), cv2.IMREAD_UNCHANGED)
    assert pred.shape == (48, 80)
    decoded = _decode_polygons(sub["seg"][f"val{i}.jpg"], pred.shape)
    assert (decoded == pred).mean() > 0.99

  # cls: one prediction per line of the list file, under its image names.
  names = [line.split()[0] for line in open(val_list)]
  assert sorted(sub["cls"]) == sorted(names)
  assert all(0 <= v < 196 for v in sub["cls"].values())
  for key in ("seg/mIoU", "cls/top1"):
    assert printed[key] == pytest.approx(reported[key], abs=5e-5)
  assert reported["score"] == pytest.approx(
      np.mean([reported[k] for k in ("det/mAP50", "seg/mIoU", "cls/top1")]))
