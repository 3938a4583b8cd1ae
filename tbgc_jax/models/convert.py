"""Official InternImage PyTorch checkpoints -> parameters of ``tbgc_jax.models.InternImage``.

Usage::

  python -m tbgc_jax.models.convert internimage_t_1k_224.pth out_dir [--preset t]

writes ``out_dir/internimage_<preset>.npz``: a flat ``.npz`` whose keys are our backbone
parameter paths joined by ``/`` (``levels/0/blocks/1/dcn/offset/kernel``), float32 arrays in
Flax layouts, plus ``__config__`` (the architecture as JSON). The trainer initialises the
backbone with ``load_backbone_weights(model, path)``. Reading ``.pth`` needs torch (the
``convert`` extra: ``pip install 'tbgc-jax[convert]'``); everything else here is numpy.

Accepted checkpoints: the classification releases (``{"model": state_dict}``; the
``conv_head``/``head`` classifier is dropped) and mmdet/mmseg releases (``{"state_dict": ...}``
with ``backbone.``-prefixed keys; other components are dropped). Names follow the official
modules (``build_norm_layer`` wraps each norm in an ``nn.Sequential``, hence the ``.0``/``.1``
indices): see ``official_param_table``.
"""

import argparse
import dataclasses
import json
import pathlib
from collections.abc import Mapping

import numpy as np
from flax import nnx

from tbgc_jax.models import stacking
from tbgc_jax.models.internimage import BLOCK_LISTS, PRESETS, InternImage, InternImageConfig
from tbgc_jax.models.rngs import construction_rngs

# Layout conversions, official (torch) -> ours (Flax).
_IDENTITY = "identity"  # biases, LayerNorm weight -> scale, LayerNorm bias, layer scales
_LINEAR = "linear"  # [out, in] -> [in, out]
_CONV = "conv"  # OIHW -> HWIO (depthwise: [C, 1, k, k] -> [k, k, 1, C])

# Official keys that are not backbone parameters (classifier, BatchNorm buffers).
_IGNORED_PREFIXES = ("conv_head.", "head.")
_IGNORED_SUFFIXES = (".num_batches_tracked", ".running_mean", ".running_var")
_CONFIG_KEY = "__config__"
_LAYER_SCALES = ("gamma1", "gamma2")
# Architecture fields a converted file must agree on (the rest are training settings).
_ARCH_FIELDS = ("channels", "depths", "groups", "mlp_ratio", "offset_scale", "post_norm",
                "dw_kernel_size")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One official parameter and where it goes.

  Attributes:
    official: official name (classification checkpoint, no ``backbone.`` prefix).
    path: our parameter path inside the backbone.
    shape: official (torch) shape.
    layout: ``"identity"``, ``"linear"`` or ``"conv"``.
  """

  official: str
  path: tuple[str | int, ...]
  shape: tuple[int, ...]
  layout: str


def _to_flax(spec: ParamSpec, array: np.ndarray) -> np.ndarray:
  array = np.asarray(array, np.float32)
  if spec.layout == _LINEAR:
    return array.T
  if spec.layout == _CONV:
    return array.transpose(2, 3, 1, 0)
  return array


def _flax_shape(spec: ParamSpec) -> tuple[int, ...]:
  return _to_flax(spec, np.empty(spec.shape, np.float32)).shape


def path_key(path: tuple[str | int, ...]) -> str:
  """``('levels', 0, 'norm', 'scale')`` -> ``'levels/0/norm/scale'`` (the ``.npz`` keys)."""
  return "/".join(str(p) for p in path)


def official_param_table(config: InternImageConfig) -> list[ParamSpec]:
  """All backbone parameters of the official model for ``config``, in module order.

  Mirrors the official module tree (``StemLayer`` -> ``patch_embed``; ``InternImageBlock``
  -> ``levels.i`` with ``blocks.j`` (``InternImageLayer``), ``norm`` and ``downsample``).

  Args:
    config: the architecture.

  Returns:
    One ``ParamSpec`` per official parameter tensor.
  """
  specs: list[ParamSpec] = []

  def add(name, path, shape, layout=_IDENTITY):
    specs.append(ParamSpec(name, tuple(path), tuple(shape), layout))

  def linear(name, path, n_in, n_out):
    add(f"{name}.weight", (*path, "kernel"), (n_out, n_in), _LINEAR)
    add(f"{name}.bias", (*path, "bias"), (n_out,))

  def norm(name, path, n):
    add(f"{name}.weight", (*path, "scale"), (n,))
    add(f"{name}.bias", (*path, "bias"), (n,))

  c = config.channels
  add("patch_embed.conv1.weight", ("patch_embed", "conv1", "kernel"), (c // 2, 3, 3, 3), _CONV)
  add("patch_embed.conv1.bias", ("patch_embed", "conv1", "bias"), (c // 2,))
  norm("patch_embed.norm1.1", ("patch_embed", "norm1"), c // 2)
  add("patch_embed.conv2.weight", ("patch_embed", "conv2", "kernel"), (c, c // 2, 3, 3), _CONV)
  add("patch_embed.conv2.bias", ("patch_embed", "conv2", "bias"), (c,))
  norm("patch_embed.norm2.1", ("patch_embed", "norm2"), c)
  dwk = config.dw_kernel_size or 3
  points = 9  # kernel_size 3 in every InternImage layer
  for i, depth in enumerate(config.depths):
    ch, g = c * 2**i, config.groups[i]
    hidden = int(ch * config.mlp_ratio)
    for j in range(depth):
      name, path = f"levels.{i}.blocks.{j}", ("levels", i, "blocks", j)
      norm(f"{name}.norm1.0", (*path, "norm1"), ch)
      add(f"{name}.dcn.dw_conv.0.weight", (*path, "dcn", "dw_conv", "kernel"), (ch, 1, dwk, dwk),
          _CONV)
      add(f"{name}.dcn.dw_conv.0.bias", (*path, "dcn", "dw_conv", "bias"), (ch,))
      norm(f"{name}.dcn.dw_conv.1.1", (*path, "dcn", "dw_norm"), ch)
      linear(f"{name}.dcn.offset", (*path, "dcn", "offset"), ch, g * points * 2)
      linear(f"{name}.dcn.mask", (*path, "dcn", "mask"), ch, g * points)
      linear(f"{name}.dcn.input_proj", (*path, "dcn", "input_proj"), ch, ch)
      linear(f"{name}.dcn.output_proj", (*path, "dcn", "output_proj"), ch, ch)
      norm(f"{name}.norm2.0", (*path, "norm2"), ch)
      linear(f"{name}.mlp.fc1", (*path, "mlp", "fc1"), ch, hidden)
      linear(f"{name}.mlp.fc2", (*path, "mlp", "fc2"), hidden, ch)
      if config.layer_scale is not None:
        add(f"{name}.gamma1", (*path, "gamma1"), (ch,))
        add(f"{name}.gamma2", (*path, "gamma2"), (ch,))
    if not config.post_norm:
      norm(f"levels.{i}.norm.0", ("levels", i, "norm"), ch)
    if i < 3:
      add(f"levels.{i}.downsample.conv.weight", ("levels", i, "downsample", "conv", "kernel"),
          (2 * ch, ch, 3, 3), _CONV)
      norm(f"levels.{i}.downsample.norm.1", ("levels", i, "downsample", "norm"), 2 * ch)
  return specs


class CheckpointMismatchError(ValueError):
  """Names or shapes of a checkpoint do not match the expected parameters (all listed)."""


def _raise_mismatches(source: str, missing, unexpected, wrong_shape) -> None:
  if not (missing or unexpected or wrong_shape):
    return
  lines = [f"{source}: parameters do not match the InternImage architecture"]
  lines += [f"  missing: {n}" for n in missing]
  lines += [f"  unexpected: {n}" for n in unexpected]
  lines += [f"  shape: {n}: got {got}, expected {want}" for n, got, want in wrong_shape]
  raise CheckpointMismatchError("\n".join(lines))


def backbone_state_dict(checkpoint: Mapping) -> dict:
  """The backbone tensors of an official checkpoint, under classification-style names.

  Args:
    checkpoint: a loaded ``.pth``: a state dict, or a dict holding one under ``"model"``,
      ``"state_dict"`` or ``"module"``.

  Returns:
    ``{name: tensor}`` with any ``backbone.`` prefix removed and non-backbone entries
    (classifier, BatchNorm buffers, detector/segmentor heads) dropped.
  """
  for key in ("model", "state_dict", "module"):
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
      checkpoint = checkpoint[key]
      break
  if any(k.startswith("backbone.") for k in checkpoint):
    checkpoint = {k[len("backbone."):]: v for k, v in checkpoint.items()
                  if k.startswith("backbone.")}
  return {k: v for k, v in checkpoint.items()
          if not k.startswith(_IGNORED_PREFIXES) and not k.endswith(_IGNORED_SUFFIXES)}


def convert_state_dict(
    state_dict: Mapping, config: InternImageConfig, *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
  """Converts official backbone tensors to our flat parameters.

  Args:
    state_dict: ``{official name: array-like}`` (as returned by ``backbone_state_dict``;
      torch tensors must already be numpy arrays).
    config: the architecture the checkpoint is for.
    source: name of the checkpoint for error messages.

  Returns:
    ``{path_key(our path): float32 array in Flax layout}``.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected or mis-shaped name.
  """
  table = official_param_table(config)
  expected = {s.official for s in table}
  missing = [s.official for s in table if s.official not in state_dict]
  unexpected = sorted(k for k in state_dict if k not in expected)
  wrong = [(s.official, tuple(np.shape(state_dict[s.official])), s.shape) for s in table
           if s.official in state_dict and tuple(np.shape(state_dict[s.official])) != s.shape]
  _raise_mismatches(source, missing, unexpected, wrong)
  return {path_key(s.path): _to_flax(s, state_dict[s.official]) for s in table}


def infer_config(state_dict: Mapping) -> InternImageConfig:
  """The preset whose official parameter names and shapes match ``state_dict``.

  ``offset_scale`` does not show in shapes; it is taken from the matching preset (1.0 for
  T/S/B, 2.0 for L/XL). The first matching preset wins: an mmdet/mmseg InternImage-T
  checkpoint (with layer scale) gives "t_downstream"; InternImage-S has the same parameters in
  classification and downstream ("s", "s_downstream" differ only in drop path).

  Raises:
    CheckpointMismatchError: if no preset matches.
  """
  names = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  for config in PRESETS.values():
    table = official_param_table(config)
    if len(table) == len(names) and all(names.get(s.official) == s.shape for s in table):
      return config
  raise CheckpointMismatchError(
      f"the checkpoint matches none of the presets {sorted(PRESETS)}; pass --preset to see "
      "the mismatches against one")


def save_backbone_weights(params: Mapping[str, np.ndarray], config: InternImageConfig,
                          path: str | pathlib.Path) -> None:
  """Writes converted parameters and their architecture to a ``.npz`` file."""
  arrays = dict(params)
  arrays[_CONFIG_KEY] = np.array(json.dumps(dataclasses.asdict(config)))
  np.savez(path, **arrays)


def load_backbone_weights(model: nnx.Module, path: str | pathlib.Path) -> None:
  """Loads a converted ``.npz`` into a backbone, in place.

  Works on concrete models and on abstract ones (``nnx.eval_shape``), whose parameters it
  then makes concrete. A file without layer scales loads into a backbone with them (the
  gammas get ``config.layer_scale``, like the official downstream fine-tuning). Files hold
  the unrolled layout (``levels/i/blocks/j/...``); a ``scan_blocks`` backbone gets them
  stacked per level (`tbgc_jax.models.internimage.stack_blocks`), names and shapes being
  checked per block as for an unrolled one.

  Args:
    model: an ``InternImage``, or a module holding one as ``model.backbone`` (the
      multi-task model).
    path: a file written by ``save_backbone_weights`` / the CLI.

  Raises:
    CheckpointMismatchError: if architecture, names or shapes differ (all listed).
  """
  backbone = getattr(model, "backbone", model)
  with np.load(path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  source = str(path)
  saved = json.loads(str(arrays.pop(_CONFIG_KEY))) if _CONFIG_KEY in arrays else None
  config = getattr(backbone, "config", None)
  if saved is not None and config is not None:
    arch = json.loads(json.dumps(dataclasses.asdict(config)))
    diffs = [f"{f}: file {saved.get(f)!r}, model {arch[f]!r}" for f in _ARCH_FIELDS
             if arch[f] != saved.get(f)]
    if diffs:
      raise CheckpointMismatchError(
          f"{source}: architecture differs from the model's: " + "; ".join(diffs))
  flat = list(nnx.to_flat_state(nnx.state(backbone, nnx.Param)))
  scanned = bool(getattr(config, "scan_blocks", False))
  if scanned:
    flat = list(stacking.unstack_flat(dict(flat), BLOCK_LISTS).items())
  ours = {path_key(p): v for p, v in flat}
  layer_scale = getattr(config, "layer_scale", None)
  if layer_scale is not None:
    # A classification checkpoint without layer scale into a backbone with it (InternImage-T
    # into "t_downstream"): the gammas keep their initial value, as the official mmdet/mmseg
    # fine-tuning does (init, then a non-strict load of the pretrained weights).
    for k, v in ours.items():
      if k not in arrays and k.rsplit("/", 1)[-1] in _LAYER_SCALES:
        arrays[k] = np.full(tuple(v.shape), layer_scale, np.float32)
  missing = sorted(k for k in ours if k not in arrays)
  unexpected = sorted(k for k in arrays if k not in ours)
  wrong = [(k, arrays[k].shape, tuple(v.shape)) for k, v in ours.items()
           if k in arrays and arrays[k].shape != tuple(v.shape)]
  _raise_mismatches(source, missing, unexpected, wrong)
  new = [(p, v.replace(np.asarray(arrays[path_key(p)], v.dtype))) for p, v in flat]
  if scanned:
    new = list(stacking.stack_flat(dict(new), BLOCK_LISTS).items())
  nnx.update(backbone, nnx.from_flat_state(new))


def _load_torch_checkpoint(path: str) -> dict:
  try:
    import torch  # noqa: PLC0415 - optional dependency, only for reading .pth files
  except ImportError as e:
    raise ImportError(
        "reading a PyTorch checkpoint needs torch: pip install 'tbgc-jax[convert]'") from e
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  state = backbone_state_dict(checkpoint)
  return {k: v.detach().float().numpy() for k, v in state.items()}


def convert_file(src: str | pathlib.Path, out_dir: str | pathlib.Path,
                 preset: str | None = None) -> pathlib.Path:
  """Converts an official ``.pth`` checkpoint; returns the path of the written ``.npz``."""
  state = _load_torch_checkpoint(str(src))
  if preset is None:
    config = infer_config(state)
    preset = next(k for k, v in PRESETS.items() if v == config)
  elif preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
  config = PRESETS[preset]
  params = convert_state_dict(state, config, source=str(src))
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  dest = out / f"internimage_{preset}.npz"
  save_backbone_weights(params, config, dest)
  return dest


def check_against_model(params: Mapping[str, np.ndarray], config: InternImageConfig) -> None:
  """Checks converted parameters against an abstract ``InternImage(config)`` (no allocation).

  Raises:
    CheckpointMismatchError: listing every difference in names or shapes.
  """
  model = nnx.eval_shape(lambda: InternImage(config, rngs=construction_rngs(0)))
  ours = {path_key(p): tuple(v.shape)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  missing = sorted(k for k in ours if k not in params)
  unexpected = sorted(k for k in params if k not in ours)
  wrong = [(k, params[k].shape, s) for k, s in ours.items()
           if k in params and params[k].shape != s]
  _raise_mismatches("converted parameters", missing, unexpected, wrong)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("checkpoint", help="official InternImage .pth file")
  parser.add_argument("out_dir", help="directory for internimage_<preset>.npz")
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="architecture (default: inferred from names and shapes)")
  args = parser.parse_args(argv)
  dest = convert_file(args.checkpoint, args.out_dir, args.preset)
  print(f"wrote {dest}")


if __name__ == "__main__":
  main()
