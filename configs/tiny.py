"""The embedded default: tiny InternImage + DINO + Mask2Former + ArcFace heads, CPU-sized.

Trains and evaluates on the embedded data (generated on first use, nothing downloaded) on a
2-core CPU in a few minutes:

  python train.py --config configs/tiny.py --workdir /tmp/tbgc_tiny
  python eval.py --config configs/tiny.py --workdir /tmp/tbgc_tiny

Override any field on the command line, e.g. ``--config.grad.method=vanilla``.
"""

import ml_collections

from tbgc_jax.data import configs as data_configs
from tbgc_jax.models.detection import DINOConfig
from tbgc_jax.models.internimage import InternImageConfig
from tbgc_jax.models.segmentation import Mask2FormerConfig
from tbgc_jax.presets import override_fields
from tbgc_jax.schema import TASKS


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tasks = TASKS
  c.data = data_configs.tiny()  # each task's augment.mode: "multi_branch" (Table 1)
  # A shortcut that sets every task's data.<task>.augment.mode: "multi_branch" (Table 1),
  # "plain" (the Table 2 setting) or "parallel" (Table 3 baseline); "" leaves them as they are.
  c.augment_mode = ""

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "tiny"  # InternImage preset: tiny, t, s, b, l, xl
  # Each preset's every field, None = the preset's: --config.model.det.overrides.loss_class=2.0
  c.model.backbone_overrides = override_fields(InternImageConfig)
  c.model.drop_path_rate = 0.0  # < 0 keeps the preset's
  c.model.pretrained = ""  # converted InternImage .npz (python -m tbgc_jax.models.convert)
  c.model.require_pretrained = False  # True: refuse random init unless pretrained="none"
  # DINO's class term weighs 4, not 1 as on COCO: with 1 the detector found the boxes but not
  # the digits (class-agnostic mAP50 49.3, mAP50 8.8 at 2,000 steps); with 4, 60.9 and 33.8,
  # the box losses unchanged and cls top-1 up too (docs/trainer.md).
  c.model.det = ml_collections.ConfigDict(
      {"preset": "tiny",
       "overrides": override_fields(DINOConfig, num_queries=30, loss_class=4.0)})
  c.model.seg = ml_collections.ConfigDict(
      {"preset": "tiny", "overrides": override_fields(Mask2FormerConfig)})
  # ArcFace's margin is 0.4 in the paper (configs/challenge.py), on a pretrained backbone. From
  # random init, a margin makes collapse the easiest way down: every embedding and class centre
  # on one direction (embedding_cos 0.73 -> 0.99 in 100 steps, center_cos 0 -> 0.55, top-1 at
  # chance; docs/trainer.md). Without it the head learns (the cosine classifier of ArcFace).
  c.model.cls = ml_collections.ConfigDict({"margin": 0.0, "scale": 30.0, "hidden_dim": 0})

  c.grad = ml_collections.ConfigDict()
  c.grad.method = "tbgc"  # any of tbgc_jax.method_names(): none, vanilla, tbgc_star, tbgc, ...
  # Fields below that the method takes are passed to it; others in `hparams`.
  c.grad.max_norm = 0.1
  c.grad.rescale_heads = True  # the paper's formula; False rescales only backbone leaves
  c.grad.hparams = ml_collections.ConfigDict()  # other hyperparameters of the method
  # Algorithm 1: "per_task_jit" runs one jitted value_and_grad per task, then the update;
  # "fused" puts everything in one jit (slow to compile on CPU), where `sequential` makes
  # XLA keep one task's activations at a time (tbgc_jax.per_task_value_and_grad).
  c.grad.step_mode = "per_task_jit"
  c.grad.sequential = True

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.backbone_lr_mult = 1.0  # random-init tiny backbone: no pretrained weights to keep
  c.optim.warmup_epochs = 0.5
  c.optim.warmup_ratio = 0.001
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999

  # A task whose loss or gradient is non-finite: "drop_task" leaves it out of that step's
  # update (counted, logged) and stops after `max_consecutive` such steps of one task in a
  # row; "stop" stops at the first. Non-finite parameters always stop. Either way the run
  # stops before the affected state is checkpointed.
  c.nonfinite = ml_collections.ConfigDict({"policy": "drop_task", "max_consecutive": 5})

  c.loss_weights = ml_collections.ConfigDict({"det": 1.0, "seg": 1.0, "cls": 1.0})
  c.num_epochs = 5  # 2,000 steps: about 6 to 7 min for train.py + eval.py on a 2-core CPU
  c.total_steps = 0  # > 0 overrides num_epochs
  c.log_every = 10
  c.eval_every = 0  # > 0: also evaluate (val/... in the logs) every this many steps
  # Evaluations by name, {type, task, split, every}; empty: one per task on val, every
  # eval_every steps (tbgc_jax.trainer.evaluate.eval_specs).
  c.evals = ml_collections.ConfigDict()
  # Start a new run from another run's checkpoint: "WORKDIR[:STEP]", taking "params" or
  # "params+opt_state" (ignored once this run has checkpoints of its own).
  c.init_from = ""
  c.init_from_parts = "params"
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.num_workers = 0  # grain worker processes per task
  c.mesh_devices = 0  # 0 = all devices
  return c
