"""Official InternImage checkpoint names/shapes -> our parameters."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.models import convert
from tbgc_jax.models.classification import ClassificationHead
from tbgc_jax.models.internimage import PRESETS, InternImage, stack_blocks
from tbgc_jax.models.multitask import MultiTaskModel

TINY = PRESETS["tiny"]

# A few names as they appear in the official InternImage-T checkpoint (spot checks that the
# table mirrors the official module tree, including nn.Sequential indices).
_KNOWN_OFFICIAL = [
    "patch_embed.conv1.weight", "patch_embed.norm1.1.weight", "patch_embed.norm2.1.bias",
    "levels.0.blocks.0.norm1.0.weight", "levels.0.blocks.0.dcn.dw_conv.0.weight",
    "levels.0.blocks.0.dcn.dw_conv.1.1.bias", "levels.0.blocks.0.dcn.offset.weight",
    "levels.0.blocks.0.dcn.mask.bias", "levels.0.blocks.0.dcn.input_proj.weight",
    "levels.0.blocks.0.mlp.fc2.weight", "levels.0.norm.0.weight",
    "levels.2.downsample.conv.weight", "levels.2.downsample.norm.1.weight",
    "levels.3.blocks.0.dcn.output_proj.bias",
]


def _random_checkpoint(config, seed=0):
  rng = np.random.default_rng(seed)
  return {s.official: rng.normal(size=s.shape).astype(np.float32)
          for s in convert.official_param_table(config)}


def _abstract(config):
  return nnx.eval_shape(lambda: InternImage(config, rngs=nnx.Rngs(0)))


def test_table_matches_official_names_and_our_model():
  names = {s.official for s in convert.official_param_table(PRESETS["t"])}
  assert set(_KNOWN_OFFICIAL) <= names
  assert "levels.3.downsample.conv.weight" not in names
  for config in (TINY, dataclasses.replace(TINY, post_norm=True, layer_scale=1e-5)):
    params = convert.convert_state_dict(_random_checkpoint(config), config)
    convert.check_against_model(params, config)  # every path and shape of our model


def test_convert_save_load_places_values(tmp_path):
  sd = _random_checkpoint(TINY)
  wrapped = {"model": {**sd, "head.weight": np.zeros((1000, 192)),
                       "conv_head.1.0.running_mean": np.zeros(192)}}
  params = convert.convert_state_dict(convert.backbone_state_dict(wrapped), TINY)
  path = tmp_path / "tiny.npz"
  convert.save_backbone_weights(params, TINY, path)
  model = _abstract(TINY)
  convert.load_backbone_weights(model, path)
  block = model.levels[1].blocks[0]
  np.testing.assert_array_equal(
      block.dcn.offset.kernel[...], sd["levels.1.blocks.0.dcn.offset.weight"].T)
  np.testing.assert_array_equal(block.norm2.scale[...], sd["levels.1.blocks.0.norm2.0.weight"])
  np.testing.assert_array_equal(
      block.dcn.dw_conv.kernel[...],
      sd["levels.1.blocks.0.dcn.dw_conv.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      model.levels[0].downsample.norm.bias[...], sd["levels.0.downsample.norm.1.bias"])
  # The multi-task model: only its backbone is filled.
  multi = nnx.eval_shape(lambda: MultiTaskModel(
      InternImage(TINY, rngs=nnx.Rngs(0)),
      {"cls": ClassificationHead((16, 32, 64, 128), 3, rngs=nnx.Rngs(0))}))
  convert.load_backbone_weights(multi, path)
  np.testing.assert_array_equal(
      multi.backbone.patch_embed.conv2.bias[...], sd["patch_embed.conv2.bias"])
  assert isinstance(multi.heads["cls"].centers.get_value(), jax.ShapeDtypeStruct)


def test_conv_layout_matches_torch_semantics():
  """Our conv with a converted OIHW kernel computes torch's cross-correlation (loops)."""
  rng = np.random.default_rng(2)
  weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)  # like patch_embed.conv1
  bias = rng.normal(size=4).astype(np.float32)
  x = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)
  conv = nnx.Conv(3, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                  rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  conv.kernel.set_value(weight.transpose(2, 3, 1, 0))
  conv.bias.set_value(bias)
  got = np.asarray(conv(x))
  padded = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  want = np.zeros((3, 3, 4))
  for o in range(4):
    for y in range(3):
      for xx in range(3):
        patch = padded[2 * y:2 * y + 3, 2 * xx:2 * xx + 3, :]  # [ky, kx, i]
        want[y, xx, o] = np.sum(patch * weight[o].transpose(1, 2, 0)) + bias[o]
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def test_mismatches_are_all_listed():
  sd = _random_checkpoint(TINY)
  del sd["levels.0.blocks.0.dcn.mask.bias"]
  sd["levels.0.blocks.0.bogus.weight"] = np.zeros(3)
  sd["levels.1.blocks.0.mlp.fc1.weight"] = np.zeros((5, 5))
  with pytest.raises(convert.CheckpointMismatchError) as err:
    convert.convert_state_dict(sd, TINY, source="ckpt.pth")
  msg = str(err.value)
  assert "ckpt.pth" in msg
  assert "missing: levels.0.blocks.0.dcn.mask.bias" in msg
  assert "unexpected: levels.0.blocks.0.bogus.weight" in msg
  assert "shape: levels.1.blocks.0.mlp.fc1.weight: got (5, 5), expected (128, 32)" in msg


def test_detection_checkpoint_prefix_and_inference():
  sd = _random_checkpoint(TINY)
  mmdet = {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                          "neck.fpn.weight": np.zeros(3)}}
  state = convert.backbone_state_dict(mmdet)
  assert set(state) == set(sd)
  assert convert.infer_config(state) == TINY
  del state["levels.0.norm.0.weight"]
  with pytest.raises(convert.CheckpointMismatchError, match="matches none"):
    convert.infer_config(state)


def test_load_rejects_other_architecture(tmp_path):
  path = tmp_path / "tiny.npz"
  convert.save_backbone_weights(convert.convert_state_dict(_random_checkpoint(TINY), TINY),
                                TINY, path)
  other = dataclasses.replace(TINY, offset_scale=2.0)  # same shapes, other semantics
  with pytest.raises(convert.CheckpointMismatchError, match="offset_scale"):
    convert.load_backbone_weights(_abstract(other), path)
  wider = dataclasses.replace(TINY, channels=8)
  with pytest.raises(convert.CheckpointMismatchError, match="channels"):
    convert.load_backbone_weights(_abstract(wider), path)


def test_torch_round_trip(tmp_path):
  try:
    import torch
  except ImportError:
    with pytest.raises(ImportError, match=r"tbgc-jax\[convert\]"):
      convert.main([str(tmp_path / "x.pth"), str(tmp_path)])
    pytest.skip("torch is not installed (optional 'convert' extra): only the missing-torch "
                "error was checked, not the .pth round trip")
  sd = _random_checkpoint(TINY)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "t.pth")
  dest = convert.convert_file(tmp_path / "t.pth", tmp_path / "out")
  assert dest.name == "internimage_tiny.npz"
  model = _abstract(TINY)
  convert.load_backbone_weights(model, dest)
  np.testing.assert_array_equal(
      model.patch_embed.norm1.scale[...], sd["patch_embed.norm1.1.weight"])


# Backbone tensors of the official mmdet/mmseg InternImage-T/S checkpoints (layer_scale=1.0):
# stem 8; per block 22 (norm1.0, dcn.{dw_conv.0, dw_conv.1.1, offset, mask, input_proj,
# output_proj}, norm2.0, mlp.fc1, mlp.fc2: weight + bias each, then gamma1, gamma2); level norms
# 2 each (pre-norm T only); downsamples 3 each (conv.weight, norm.1.weight/bias).
_DOWNSTREAM_COUNTS = {"t_downstream": 8 + 30 * 22 + 4 * 2 + 3 * 3,
                      "s_downstream": 8 + 33 * 22 + 3 * 3}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["t_downstream", "s_downstream"])
def test_official_downstream_checkpoint_converts(preset, tmp_path):
  config = PRESETS[preset]
  c = config.channels
  # Official settings of the detection/segmentation configs.
  assert (config.layer_scale, config.offset_scale, config.mlp_ratio) == (1.0, 1.0, 4.0)
  assert config.drop_path_rate == {"t_downstream": 0.2, "s_downstream": 0.3}[preset]
  assert config.post_norm == (preset == "s_downstream")
  sd = _random_checkpoint(config, seed=4)
  assert len(sd) == _DOWNSTREAM_COUNTS[preset]
  last = config.depths[2] - 1
  g = config.groups[2]
  for name, shape in [
      ("levels.0.blocks.0.gamma1", (c,)), ("levels.0.blocks.3.gamma2", (c,)),
      (f"levels.2.blocks.{last}.gamma1", (4 * c,)),
      (f"levels.2.blocks.{last}.dcn.offset.weight", (g * 9 * 2, 4 * c)),
      (f"levels.2.blocks.{last}.dcn.mask.weight", (g * 9, 4 * c)),
      ("levels.3.blocks.3.mlp.fc1.weight", (32 * c, 8 * c)),
      ("levels.2.downsample.conv.weight", (8 * c, 4 * c, 3, 3))]:
    assert sd[name].shape == shape, name
  assert ("levels.0.norm.0.weight" in sd) == (not config.post_norm)
  mmdet = {"meta": {"epoch": 12}, "state_dict": {
      **{f"backbone.{k}": v for k, v in sd.items()},
      "neck.lateral_convs.0.conv.weight": np.zeros((256, c, 1, 1)),
      "bbox_head.cls_branches.0.weight": np.zeros((80, 256))}}
  state = convert.backbone_state_dict(mmdet)
  assert set(state) == set(sd)
  params = convert.convert_state_dict(state, config, source=f"{preset}.pth")
  if preset == "t_downstream":  # S has the same parameters as the classification "s"
    assert convert.infer_config(state) == config
  path = tmp_path / "down.npz"
  convert.save_backbone_weights(params, config, path)
  model = _abstract(config)
  convert.load_backbone_weights(model, path)  # checks every path and shape of our model
  np.testing.assert_array_equal(model.levels[2].blocks[last].gamma1[...],
                                sd[f"levels.2.blocks.{last}.gamma1"])


def test_classification_checkpoint_into_layer_scale_backbone(tmp_path):
  # InternImage-T ImageNet weights (no layer scale) into the downstream preset: the gammas
  # start at layer_scale, everything else is loaded.
  down = dataclasses.replace(TINY, layer_scale=1.0)
  sd = _random_checkpoint(TINY, seed=5)
  path = tmp_path / "cls.npz"
  convert.save_backbone_weights(convert.convert_state_dict(sd, TINY), TINY, path)
  model = _abstract(down)
  convert.load_backbone_weights(model, path)
  block = model.levels[2].blocks[1]
  np.testing.assert_array_equal(block.gamma2[...], np.ones(64, np.float32))
  np.testing.assert_array_equal(block.mlp.fc1.bias[...], sd["levels.2.blocks.1.mlp.fc1.bias"])
  # Other missing parameters are still an error.
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files if k != "levels/2/blocks/1/mlp/fc1/bias"}
  np.savez(tmp_path / "partial.npz", **arrays)
  with pytest.raises(convert.CheckpointMismatchError, match="missing: levels/2/blocks/1/mlp"):
    convert.load_backbone_weights(_abstract(down), tmp_path / "partial.npz")


def test_official_weights_load_into_the_scanned_backbone(tmp_path):
  # Official names -> our unrolled .npz -> a scan_blocks backbone: the stacked values of the
  # unrolled backbone loaded from the same file (layer scales filled in for a file lacking
  # them, as for the unrolled backbone).
  config = dataclasses.replace(TINY, depths=(2, 1, 3, 1))
  sd = _random_checkpoint(config)
  path = tmp_path / "w.npz"
  params = convert.convert_state_dict(sd, config)
  convert.save_backbone_weights(params, config, path)
  for arch in (config, dataclasses.replace(config, layer_scale=0.5)):
    unrolled, scanned = _abstract(arch), _abstract(dataclasses.replace(arch, scan_blocks=True))
    convert.load_backbone_weights(unrolled, path)
    convert.load_backbone_weights(scanned, path)
    want = stack_blocks(nnx.state(unrolled, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, want, nnx.state(scanned, nnx.Param))
  blocks = scanned.levels[2].blocks
  np.testing.assert_array_equal(blocks.dcn.offset.kernel[...][1],
                                sd["levels.2.blocks.1.dcn.offset.weight"].T)
  np.testing.assert_array_equal(blocks.gamma2[...], np.full((3, 64), 0.5, np.float32))
  # Mismatches are reported per block, as for the unrolled backbone (a file without its
  # architecture, so that names and shapes are what is checked).
  np.savez(tmp_path / "bare.npz", **params)
  deeper = dataclasses.replace(config, depths=(2, 1, 4, 1), scan_blocks=True)
  with pytest.raises(convert.CheckpointMismatchError, match="missing: levels/2/blocks/3/"):
    convert.load_backbone_weights(_abstract(deeper), tmp_path / "bare.npz")
