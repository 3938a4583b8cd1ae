"""Every trainer config in configs/ builds its model; the challenge config is the paper's recipe.

Models are built abstractly with `construction_rngs` (about 2 s for the challenge size on a
2-core CPU; with ``nnx.Rngs`` it took about a minute, see `tbgc_jax.models.rngs`), once per
test module.
"""

import functools
import importlib
import logging
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from tbgc_jax.models.rngs import construction_rngs
from tbgc_jax.models.stacking import num_layers
from tbgc_jax.presets import override_fields
from tbgc_jax.tasks.detection import det_config
from tbgc_jax.tasks.segmentation import seg_config
from tbgc_jax.trainer.model_factory import backbone_config, build_model
from tbgc_jax.trainer.optim import lr_schedules
from tbgc_jax.trainer.setup import Setup, validate_config
from tests import micro_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@functools.cache
def _abstract_model(name):
  config = _config(name)
  return nnx.eval_shape(lambda: build_model(config, rngs=construction_rngs(0)))


def test_configs_are_found():
  assert {"tiny", "challenge"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_builds_its_model(name):
  config = _config(name)
  model = _abstract_model(name)
  assert set(model.heads.keys()) == set(config.tasks)
  det = model.heads["det"]
  assert det.config.num_queries >= config.data.det.max_boxes
  assert det.num_classes == config.data.det.num_classes
  assert model.heads["seg"].class_embed.out_features == config.data.seg.num_classes + 1
  assert model.heads["cls"].centers.shape[-1] == config.data.cls.num_classes


def test_challenge_config_is_the_papers_recipe():
  c = _config("challenge")
  # Data: the challenge's class counts and the paper's per-GPU batch sizes.
  assert [c.data[t].num_classes for t in ("det", "seg", "cls")] == [45, 19, 196]
  assert [c.data[t].batch_size for t in ("det", "seg", "cls")] == [2, 2, 8]
  assert c.data.det.source.format == "coco" and c.data.det.max_boxes == 100
  # Optimisation.
  assert c.optim.lr == 1e-4 and c.optim.backbone_lr_mult == 0.1
  assert c.optim.weight_decay == 1e-4
  assert c.optim.warmup_epochs == 5 and c.optim.warmup_ratio == 0.001
  assert c.num_epochs == 100 and c.total_steps == 0
  assert c.grad.method == "tbgc" and c.grad.max_norm == 0.1
  assert c.model.cls.margin == 0.4
  assert c.model.backbone == "t"
  for head in (c.model.det, c.model.seg):
    assert {k: v for k, v in head.overrides.items() if v is not None} == {"scan_layers": True}
  det = det_config(c)
  assert det.num_queries == 900 and det.num_denoising == 100

  # The schedule it produces: linear warm-up over 5 epochs from lr * 0.001, cosine to 0
  # at 100 epochs, backbone at 0.1x.
  steps_per_epoch = 10
  sched = lr_schedules(c.optim, c.num_epochs * steps_per_epoch, steps_per_epoch)
  head, backbone = sched["head"], sched["backbone"]
  np.testing.assert_allclose(float(head(0)), 1e-7, rtol=1e-5)
  np.testing.assert_allclose(float(head(50)), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(float(backbone(50)), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(head(50 + 475)), 0.5e-4, rtol=1e-4)  # cosine midpoint
  np.testing.assert_allclose(float(head(1000)), 0.0, atol=1e-12)


def test_challenge_model_has_the_papers_sizes():
  model = _abstract_model("challenge")
  det, seg, cls = (model.heads[t] for t in ("det", "seg", "cls"))
  assert det.config.num_queries == 900 and det.config.num_denoising == 100
  assert det.config.num_encoder_layers == 6 and det.config.num_decoder_layers == 6
  assert det.class_embed.out_features == 45 and det.tgt_embed.embedding.shape[0] == 900
  assert seg.class_embed.out_features == 19 + 1 and seg.query_feat.shape[0] == 100
  assert num_layers(seg.layers) == 9 and num_layers(seg.pixel_decoder.layers) == 6
  assert cls.centers.shape[-1] == 196 and cls.margin == 0.4


def test_challenge_config_refuses_a_random_backbone_unless_asked():
  c = _config("challenge")
  assert c.model.pretrained == ""
  with pytest.raises(ValueError, match=r"config\.model\.pretrained.*'none'"):
    Setup(c)  # fails before building anything
  c.model.pretrained = "none"
  validate_config(c)


def test_pretrained_none_builds_a_random_model_with_a_warning(caplog):
  c = _config("tiny")
  c.tasks = ("cls",)
  c.mesh_devices = 1
  c.model.require_pretrained = True
  c.model.pretrained = "none"
  with caplog.at_level(logging.WARNING):
    setup = Setup(c)
  assert any("random weights" in r.getMessage() for r in caplog.records)
  assert "cls" in setup.params["heads"]


def test_setup_leaves_the_callers_config_as_it_is():
  c = micro_config.get_config("cls")
  assert c.augment_mode == "" and c.data.cls.augment.mode == "plain"
  # Without the shortcut, each task's own mode is the run's.
  assert Setup(c).config.data.cls.augment.mode == "plain"
  c.augment_mode = "multi_branch"
  c.lock()
  before = c.to_dict()
  setup = Setup(c)
  assert c.to_dict() == before and c.is_locked
  # The run reads the resolved copy: the shortcut applied to every task, and kept in one
  # place only (the tasks' sections).
  assert setup.config.data.cls.augment.mode == "multi_branch"
  assert setup.config.augment_mode == ""
  assert c.data.cls.augment.mode == "plain"
  frozen = ml_collections.FrozenConfigDict(c)
  assert Setup(frozen).config.data.cls.augment.mode == "multi_branch"
  assert frozen.data.cls.augment.mode == "plain"


def test_head_overrides_replace_preset_fields_and_an_unknown_one_is_named():
  c = micro_config.get_config("det,seg,cls")
  seg, det = seg_config(c), det_config(c)
  assert (seg.hidden_dim, seg.num_queries, seg.num_points) == (8, 12, 16)
  assert (seg.oversample_ratio, seg.class_weight) == (3.0, 2.0)  # kept from the preset
  assert (det.hidden_dim, det.num_queries, det.num_select) == (16, 24, 12)
  assert det.feature_levels == (1, 2, 3)
  c.model.det.overrides.feature_levels = [2, 3]
  assert det_config(c).feature_levels == (2, 3)
  c.model.seg.overrides = dict(c.model.seg.overrides, num_quries=4)
  with pytest.raises(ValueError, match=r"config\.model\.seg\.overrides: unknown fields "
                                       r"\['num_quries'\].*'num_queries'"):
    seg_config(c)
  c.model.det.preset = "huge"
  with pytest.raises(ValueError, match=r"config\.model\.det\.preset: unknown preset 'huge'"):
    det_config(c)


def test_every_preset_field_overrides_from_the_command_line():
  # The README's promise: any field, including a preset's that the config file never set.
  argv = ["train.py", f"--config={CONFIG_DIR / 'tiny.py'}",
          "--config.model.det.overrides.loss_class=2.5",
          "--config.model.det.overrides.feature_levels=(2, 3)",
          "--config.model.seg.overrides.class_weight=3",
          "--config.model.backbone_overrides.layer_scale=0.5"]
  values = flags.FlagValues()
  # As train.py defines it; override flags are found in the argv given here (sys.argv there).
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  c = values.config
  det = det_config(c)
  assert det.loss_class == 2.5 and det.feature_levels == (2, 3)
  assert det.num_queries == 30 and det.loss_bbox == 5.0  # the config's, the preset's
  assert seg_config(c).class_weight == 3.0
  assert backbone_config(c).layer_scale == 0.5
  with pytest.raises(ValueError, match=r"DINOConfig has no fields \['loss_clas'\]"):
    override_fields(type(det), loss_clas=1.0)
