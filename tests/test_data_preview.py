"""End-to-end test of ``python -m tbgc_jax.trainer.preview`` on the tiny preset; drawing by
the kinds of the fields."""

import os
import textwrap

import cv2
import numpy as np

from tbgc_jax.data import preview
from tbgc_jax.tasks import get_task
from tbgc_jax.trainer import preview as preview_cli


def test_preview_cli_tiny(tmp_path, embedded_root):
  root = embedded_root
  cfg_file = tmp_path / "tiny_config.py"
  cfg_file.write_text(textwrap.dedent(f"""
      import ml_collections
      from tbgc_jax.data import configs

      def get_config():
        c = ml_collections.ConfigDict()
        c.data = configs.tiny()
        for t in ("det", "seg", "cls"):
          c.data[t].source.root = {root!r}
        return c
      """))
  out = tmp_path / "preview"
  # The CLI entry point, in-process (a subprocess would add ~5 s of imports on 2 cores).
  assert preview_cli.main(["--config", str(cfg_file), "--out", str(out), "--num", "4"]) == 0
  expected = ["det_branch0.png", "det_branch1.png", "det_eval.png", "seg_branch0.png",
              "seg_branch1.png", "seg_eval.png", "cls_branch0.png", "cls_eval.png"]
  assert sorted(os.listdir(out)) == sorted(expected)
  for name in expected:
    im = cv2.imread(str(out / name))
    assert im is not None and im.ndim == 3
    assert im.shape[0] > 60 and im.shape[1] > 4 * 60
    assert np.std(im) > 10  # not blank


def test_prediction_examples_replace_the_annotations_with_the_prediction():
  from tbgc_jax.tasks import detection

  ex = {"image": np.zeros((8, 8, 3), np.uint8), "image_mask": np.ones((8, 8), bool),
        "boxes": np.ones((3, 4), np.float32), "labels": np.ones(3, np.int32),
        "box_mask": np.array([True, True, False]), "label": np.int32(4)}
  thr = detection.GALLERY_SCORE
  pred = {"scores": np.array([0.9, thr - 0.01, thr, 0.8, 0.7], np.float32),
          "labels": np.arange(5, dtype=np.int32),
          "boxes": np.arange(20, dtype=np.float32).reshape(5, 4)}
  det = get_task("det").prediction_example(ex, pred)
  # Scores >= the threshold, in order, as many as the example has box slots.
  np.testing.assert_array_equal(det["labels"], [0, 2, 3])
  np.testing.assert_array_equal(det["boxes"], pred["boxes"][[0, 2, 3]])
  np.testing.assert_array_equal(det["box_mask"], [True, True, True])
  assert ex["labels"].tolist() == [1, 1, 1]  # the ground truth is left as it was
  none = get_task("det").prediction_example(ex, {**pred, "scores": np.zeros(5, np.float32)})
  assert not none["box_mask"].any()
  seg = get_task("seg").prediction_example(ex, {"seg": np.full((8, 8), 3, np.int32)})
  assert seg["label"].dtype == np.uint8 and (seg["label"] == 3).all()
  cls = get_task("cls").prediction_example(ex, {"label": np.int32(7)})
  assert int(cls["label"]) == 7 and int(ex["label"]) == 4
  # Each draws without error, at the image's size.
  for task, e in (("det", det), ("seg", seg), ("cls", cls)):
    fields = get_task(task).data.fields({"max_boxes": 3})
    assert preview.draw(e, fields, 10).shape == (8, 8, 3)
