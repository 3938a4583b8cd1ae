"""End-to-end test of ``python -m tbgc_jax.data.preview`` on the tiny preset."""

import os
import textwrap

import cv2
import numpy as np

from tbgc_jax.data import preview


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
  assert preview.main(["--config", str(cfg_file), "--out", str(out), "--num", "4"]) == 0
  expected = ["det_branch0.png", "det_branch1.png", "det_eval.png", "seg_branch0.png",
              "seg_branch1.png", "seg_eval.png", "cls_branch0.png", "cls_eval.png"]
  assert sorted(os.listdir(out)) == sorted(expected)
  for name in expected:
    im = cv2.imread(str(out / name))
    assert im is not None and im.ndim == 3
    assert im.shape[0] > 60 and im.shape[1] > 4 * 60
    assert np.std(im) > 10  # not blank
