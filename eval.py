"""Evaluates a checkpoint: det mAP50, seg mIoU, cls top-1 and their mean (the challenge score).

  python eval.py --config configs/tiny.py --workdir /tmp/tbgc_tiny [--step N] \\
      [--submission /tmp/submission.json] [--seg_png_dir /tmp/seg_pred]

Prints a table, writes ``<workdir>/eval_metrics_<step>.json`` and a PNG of predictions beside
the ground truth (``<workdir>/predictions_<split>_<step>.png``; ``--nogallery`` skips it), and
with --submission the challenge submission (``cls``, ``dec``, ``seg`` sections).

Reads finished checkpoints only (never the training run's lock, nor the pretrained weights:
the model is built abstractly and restored). A config that builds another model than the
checkpoint's, or a workdir without checkpoint, prints one line and exits with status 2.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_string("split", "val", "Data split to evaluate.")
_SUBMISSION = flags.DEFINE_string("submission", None, "Write the challenge submission JSON here.")
_SEG_PNG_DIR = flags.DEFINE_string(
    "seg_png_dir", None, "Also write the segmentation predictions (original resolution) as "
    "BDD100K-style label PNGs in this folder.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show library INFO logs in the terminal too "
                             "(they always go to WORKDIR/eval.log).")
_GALLERY = flags.DEFINE_bool("gallery", True, "Write WORKDIR/predictions_<split>_<step>.png: "
                             "examples of each task, the ground truth beside the prediction.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from tbgc_jax.trainer import cli
  from tbgc_jax.trainer.logs import route_library_logs

  log_file = route_library_logs(_WORKDIR.value, "eval", verbose=_VERBOSE.value)
  with cli.one_line_errors(log_file):
    _evaluate()


def _evaluate():
  from tbgc_jax.trainer import evaluate as eval_lib
  from tbgc_jax.trainer.checkpointing import restore_params
  from tbgc_jax.trainer.setup import Setup, use_compilation_cache

  use_compilation_cache(_WORKDIR.value)
  if _SEG_PNG_DIR.value:
    os.makedirs(_SEG_PNG_DIR.value, exist_ok=True)
  setup = Setup(_CONFIG.value)
  params, step = restore_params(setup, _WORKDIR.value, _STEP.value)
  evaluation = eval_lib.Evaluation(setup.config, setup.eval_graphdef, setup.mesh)
  metrics, submission = evaluation(
      params, setup.rest, split=_SPLIT.value, submission=_SUBMISSION.value is not None,
      seg_png_dir=_SEG_PNG_DIR.value)
  print(f"step {step}, split {_SPLIT.value}")
  print(eval_lib.format_table(metrics))
  out = os.path.join(_WORKDIR.value, f"eval_metrics_{step}.json")
  with open(out, "w") as f:
    json.dump({"step": step, "split": _SPLIT.value, **metrics}, f, indent=2)
  if _GALLERY.value:
    path = os.path.join(_WORKDIR.value, f"predictions_{_SPLIT.value}_{step}.png")
    evaluation.gallery(params, setup.rest, path, split=_SPLIT.value)
    print(f"predictions beside the ground truth: {path}")
  if _SUBMISSION.value:
    with open(_SUBMISSION.value, "w") as f:
      json.dump(submission, f)
    print(f"submission written to {_SUBMISSION.value}")


if __name__ == "__main__":
  from tbgc_jax.trainer.cli import parse_flags

  app.run(main, flags_parser=parse_flags)
