"""InternImage backbone (Wang et al., CVPR 2023) in Flax NNX.

Structure and parameter names mirror the official PyTorch model (``OpenGVLab/InternImage``,
``classification/models/intern_image.py``) so that ``tbgc_jax.models.convert`` maps official
checkpoints one to one: ``patch_embed`` (stem: two stride-2 3x3 convs with LayerNorm and
GELU), then four ``levels``, each a stack of ``blocks`` (DCNv3 + MLP with pre- or post-norm,
optional layer scale ``gamma1``/``gamma2`` and drop path), a level ``norm`` (absent with
post-norm) and a stride-2 ``downsample`` conv (absent after the last level). The backbone
returns each level's output before its downsample: strides 4, 8, 16, 32 with ``C, 2C, 4C,
8C`` channels, like the official detection/segmentation backbone with ``out_indices=(0, 1,
2, 3)``. The classification-only ``conv_head``/``head`` of the official model are not part of
the backbone.

Example (shapes only, traced abstractly: no weights are drawn):
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx, traverse_util
  >>> net = nnx.eval_shape(lambda: InternImage(PRESETS["tiny"], rngs=nnx.Rngs(0)))
  >>> image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  >>> [f.shape for f in nnx.eval_shape(lambda m, x: m(x), net, image)]
  [(1, 16, 16, 16), (1, 8, 8, 32), (1, 4, 4, 64), (1, 2, 2, 128)]
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tbgc_jax.models import stacking
from tbgc_jax.models.dcnv3 import DCNv3


@dataclasses.dataclass(frozen=True)
class InternImageConfig:
  """Architecture of an InternImage backbone (names as in the official configs).

  Attributes:
    channels: channels of the first level; level ``i`` has ``channels * 2**i``.
    depths: number of DCNv3 blocks per level.
    groups: DCNv3 groups per level.
    mlp_ratio: MLP hidden size over channels.
    offset_scale: DCNv3 offset scale.
    layer_scale: initial value of the per-channel residual scales, or None for none.
    post_norm: normalise the residual branch outputs (and drop the level norms).
    drop_path_rate: stochastic depth, linearly increasing from 0 to this over all blocks.
    dw_kernel_size: kernel of the depthwise conv predicting offsets (None: 3).
    scan_blocks: run each level's blocks as one stacked module under ``jax.lax.scan``
      (parameters ``levels/i/blocks/...`` with a leading block axis; see `stack_blocks`):
      the traced and compiled program holds one block per level whatever the depth.
    dw_conv_by_shifts: with ``scan_blocks``, compute the scanned blocks' depthwise conv as a
      sum of shifted products (`DCNv3`'s ``dw_conv_by_shifts``; same parameters, same values
      up to float rounding) instead of a grouped conv. A compile-time choice for XLA:CPU,
      which runs the kernel gradient of a grouped conv inside a loop 18 times slower; the
      trainer sets it per back-end (``tbgc_jax.trainer.backend``).
  """

  channels: int
  depths: tuple[int, int, int, int]
  groups: tuple[int, int, int, int]
  mlp_ratio: float = 4.0
  offset_scale: float = 1.0
  layer_scale: float | None = None
  post_norm: bool = False
  drop_path_rate: float = 0.1
  dw_kernel_size: int | None = None
  scan_blocks: bool = False
  dw_conv_by_shifts: bool = False


# Official settings, from OpenGVLab/InternImage classification/configs/
# (with_lr_decay/internimage_t_1k_224.yaml, without_lr_decay/internimage_{s,b}_1k_224.yaml,
# without_lr_decay/internimage_{l,xl}_22kto1k_384.yaml). drop_path_rate is that of the
# ImageNet fine-tuning configs. "t_downstream"/"s_downstream" are the backbones of the official
# detection and segmentation configs (detection/configs/coco/mask_rcnn_internimage_{t,s}_fpn_
# 1x_coco.py, dino_4scale_internimage_t_1x_coco_layer_wise_lr.py, segmentation/configs/ade20k/
# upernet_internimage_{t,s}_512_160k_ade20k.py): layer scale 1.0 (so their mmdet/mmseg
# checkpoints hold gamma1/gamma2, which the classification T lacks), drop path 0.2 (T) and
# 0.3 (S), offset_scale 1.0, mlp_ratio 4, post_norm as in classification. "tiny" is ours: for
# CPU tests and the embedded-data trainer, not an official model.
PRESETS: dict[str, InternImageConfig] = {
    "tiny": InternImageConfig(
        channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.1),
    "t": InternImageConfig(
        channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), drop_path_rate=0.1),
    "t_downstream": InternImageConfig(
        channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), layer_scale=1.0,
        drop_path_rate=0.2),
    "s": InternImageConfig(
        channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1e-5,
        post_norm=True, drop_path_rate=0.4),
    "s_downstream": InternImageConfig(
        channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1.0,
        post_norm=True, drop_path_rate=0.3),
    "b": InternImageConfig(
        channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1e-5,
        post_norm=True, drop_path_rate=0.5),
    "l": InternImageConfig(
        channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), offset_scale=2.0,
        layer_scale=1e-5, post_norm=True, drop_path_rate=0.1),
    "xl": InternImageConfig(
        channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96), offset_scale=2.0,
        layer_scale=1e-5, post_norm=True, drop_path_rate=0.2),
}

_LINEAR_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def _drop_path(y: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
  """Drops ``y`` per example (leading axis) with probability ``rate``, else scales by ``1 / (1 -
  rate)``: ``nnx.Dropout(rate, broadcast_dims=(1, 2, 3))`` with a traced rate and an explicit
  key. Rate 0 returns ``y`` exactly (every draw is kept, and ``y / 1.0 == y``)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
  return jax.lax.select(jnp.broadcast_to(mask, y.shape), y / jnp.asarray(keep, y.dtype),
                        jnp.zeros_like(y))


def _gelu(x: jax.Array) -> jax.Array:
  # torch.nn.GELU is the exact (erf) form; converted weights expect it.
  return jax.nn.gelu(x, approximate=False)


class _Stem(nnx.Module):
  """Two stride-2 3x3 convs (official ``StemLayer`` with LayerNorm)."""

  def __init__(self, out_channels: int, *, rngs: nnx.Rngs):
    mid = out_channels // 2
    pad = ((1, 1), (1, 1))
    self.conv1 = nnx.Conv(3, mid, (3, 3), strides=2, padding=pad, rngs=rngs)
    self.norm1 = nnx.LayerNorm(mid, epsilon=1e-6, rngs=rngs)
    self.conv2 = nnx.Conv(mid, out_channels, (3, 3), strides=2, padding=pad, rngs=rngs)
    self.norm2 = nnx.LayerNorm(out_channels, epsilon=1e-6, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _gelu(self.norm1(self.conv1(x)))
    return self.norm2(self.conv2(x))


class _Downsample(nnx.Module):
  """Stride-2 3x3 conv doubling the channels, then LayerNorm."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(
        channels, 2 * channels, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
        rngs=rngs)
    self.norm = nnx.LayerNorm(2 * channels, epsilon=1e-6, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class _Mlp(nnx.Module):
  def __init__(self, channels: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(channels, hidden, kernel_init=_LINEAR_INIT, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, channels, kernel_init=_LINEAR_INIT, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(_gelu(self.fc1(x)))


class InternImageLayer(nnx.Module):
  """One InternImage block: DCNv3 and MLP residual branches (pre- or post-norm)."""

  def __init__(
      self,
      channels: int,
      group: int,
      *,
      mlp_ratio: float = 4.0,
      offset_scale: float = 1.0,
      layer_scale: float | None = None,
      post_norm: bool = False,
      drop_path: float = 0.0,
      dw_kernel_size: int | None = None,
      rngs: nnx.Rngs,
  ):
    """Builds the block.

    Args:
      channels: input/output channels.
      group: DCNv3 groups.
      mlp_ratio: MLP hidden size over channels.
      offset_scale: DCNv3 offset scale.
      layer_scale: initial residual scale, or None for no ``gamma1``/``gamma2``.
      post_norm: ``x + f(norm(x))`` if False, ``x + norm(f(x))`` if True.
      drop_path: probability of dropping each residual branch per example (training only,
        drawn from the ``dropout`` rng stream).
      dw_kernel_size: DCNv3 offset-predictor kernel (None: 3).
      rngs: initialisation keys, and the ``dropout`` stream when ``drop_path > 0``.
    """
    self.post_norm = post_norm
    self.norm1 = nnx.LayerNorm(channels, epsilon=1e-6, rngs=rngs)
    self.dcn = DCNv3(
        channels, group=group, offset_scale=offset_scale, dw_kernel_size=dw_kernel_size,
        rngs=rngs)
    self.norm2 = nnx.LayerNorm(channels, epsilon=1e-6, rngs=rngs)
    self.mlp = _Mlp(channels, int(channels * mlp_ratio), rngs=rngs)
    if layer_scale is not None:
      self.gamma1 = nnx.Param(jnp.full((channels,), layer_scale, jnp.float32))
      self.gamma2 = nnx.Param(jnp.full((channels,), layer_scale, jnp.float32))
    else:
      self.gamma1 = self.gamma2 = None
    # Drop path = dropout of the whole residual branch per example: NHWC, one draw per n.
    self.drop_path = (
        nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if drop_path > 0 else None)

  def _residual(self, x, f, norm, gamma, drop):
    # f: the DCNv3 or the MLP branch.
    y = norm(f(x)) if self.post_norm else f(norm(x))
    if gamma is not None:
      y = gamma[...] * y
    if drop is not None:
      y = _drop_path(y, *drop)
    elif self.drop_path is not None:
      y = self.drop_path(y)
    return x + y

  def __call__(
      self, x: jax.Array, drop_path: tuple[jax.Array, jax.Array] | None = None,
      dw_conv_by_shifts: bool = False,
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: NHWC input.
      drop_path: ``(rate, key)`` of a scanned block (a traced rate; the key is split between
        the two residual branches), used instead of the block's own drop path.
      dw_conv_by_shifts: compute the depthwise conv as a sum of shifted products (`DCNv3`'s
        ``dw_conv_by_shifts``; `InternImageConfig.dw_conv_by_shifts` of a scanned level).

    Returns:
      The NHWC output, shaped like ``x``.
    """
    drops = (None, None)
    if drop_path is not None:
      rate, key = drop_path
      drops = tuple((rate, k) for k in jax.random.split(key))
    dcn = (functools.partial(self.dcn, dw_conv_by_shifts=True) if dw_conv_by_shifts
           else self.dcn)
    x = self._residual(x, dcn, self.norm1, self.gamma1, drops[0])
    return self._residual(x, self.mlp, self.norm2, self.gamma2, drops[1])


class _Level(nnx.Module):
  """One level: its blocks, then the level norm and the downsample.

  With ``cfg.scan_blocks`` the blocks are one `InternImageLayer` whose parameters carry a
  leading block axis, run under ``jax.lax.scan``. The blocks are built one by one exactly as
  in the unrolled form, drawing the same keys in the same order, and then stacked, so a
  scanned model holds ``stack_blocks`` of the unrolled model of the same seed. Drop path then
  draws one key per call from the level's ``drop_path_rngs`` stream (the last block's forked
  ``dropout`` stream; None when every rate of the level is 0), split into one key per block;
  the per-block rates are a constant scanned with the parameters, and ``deterministic``
  (set by ``train()``/``eval()``) turns drop path off.
  """

  def __init__(
      self, cfg: InternImageConfig, index: int, drop_paths: Sequence[float], *, rngs: nnx.Rngs
  ):
    channels = cfg.channels * 2**index
    scan = cfg.scan_blocks
    blocks = []
    stream = None
    for rate in drop_paths:
      blocks.append(InternImageLayer(
          channels, cfg.groups[index], mlp_ratio=cfg.mlp_ratio,
          offset_scale=cfg.offset_scale, layer_scale=cfg.layer_scale,
          post_norm=cfg.post_norm, drop_path=0.0 if scan else rate,
          dw_kernel_size=cfg.dw_kernel_size, rngs=rngs))
      if scan and rate > 0:
        # What nnx.Dropout's constructor draws, so that later parameters get the same keys.
        stream = rngs["dropout"].fork()
    if scan:
      self.blocks = stacking.stack_modules(blocks)
      self.drop_path_rates = tuple(float(r) for r in drop_paths)
      self.drop_path_rngs = stream
      self.deterministic = False
      self.dw_conv_by_shifts = bool(cfg.dw_conv_by_shifts)
    else:
      self.blocks = nnx.List(blocks)
    self.norm = None if cfg.post_norm else nnx.LayerNorm(channels, epsilon=1e-6, rngs=rngs)
    self.downsample = _Downsample(channels, rngs=rngs) if index < 3 else None

  def _scan_blocks(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.drop_path_rngs is None:
      def step(block, x, _):
        return block(x, dw_conv_by_shifts=self.dw_conv_by_shifts), None
      xs = None
    else:
      def step(block, x, drop):
        return block(x, drop_path=drop, dw_conv_by_shifts=self.dw_conv_by_shifts), None
      keys = jax.random.split(self.drop_path_rngs(), len(self.drop_path_rates))
      xs = (jnp.asarray(self.drop_path_rates, jnp.float32), keys)
    return stacking.scan(self.blocks, step, x, xs)[0]

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    if isinstance(self.blocks, InternImageLayer):
      x = self._scan_blocks(x)
    else:
      for block in self.blocks:
        x = block(x)
    if self.norm is not None:
      x = self.norm(x)
    return x, (self.downsample(x) if self.downsample is not None else None)


class InternImage(nnx.Module):
  """InternImage backbone: ``__call__(x [B,H,W,3]) -> 4 NHWC maps at strides 4/8/16/32``.

  Attributes:
    config: the architecture.
    out_channels: channels of the four outputs, ``(C, 2C, 4C, 8C)``.
  """

  def __init__(self, config: InternImageConfig | str, *, rngs: nnx.Rngs):
    """Builds the backbone.

    Args:
      config: an ``InternImageConfig`` or a key of ``PRESETS`` ("tiny", "t", "s", "b",
        "l", "xl").
      rngs: initialisation keys; also the ``dropout`` stream used by drop path (give
        ``nnx.Rngs(params=..., dropout=...)``; without a ``dropout`` key the default one is
        used).
    """
    if isinstance(config, str):
      if config not in PRESETS:
        raise ValueError(f"unknown InternImage preset {config!r}; known: {sorted(PRESETS)}")
      config = PRESETS[config]
    if len(config.depths) != 4 or len(config.groups) != 4:
      raise ValueError(f"InternImage needs 4 depths and 4 groups, got {config}")
    self.config = config
    self.out_channels = tuple(config.channels * 2**i for i in range(4))
    total = sum(config.depths)
    rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    self.patch_embed = _Stem(config.channels, rngs=rngs)
    levels = []
    start = 0
    for i, depth in enumerate(config.depths):
      levels.append(_Level(config, i, rates[start:start + depth], rngs=rngs))
      start += depth
    self.levels = nnx.List(levels)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Returns the four level outputs (before each downsample), NHWC."""
    x = self.patch_embed(x)
    features = []
    for level in self.levels:
      feature, x = level(x)
      features.append(feature)
    return features


def count_params(module: nnx.Module) -> int:
  """Number of scalar parameters (``nnx.Param``) of a module, abstract or concrete."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))


# Every level's blocks, in a backbone's tree or the multi-task model's.
BLOCK_LISTS: tuple[stacking.ListPattern, ...] = (
    ("levels", None, "blocks"), ("backbone", "levels", None, "blocks"))


def stack_blocks(tree: nnx.State | Mapping) -> nnx.State | dict:
  """Unrolled backbone parameters -> those of the ``scan_blocks`` backbone.

  Each ``levels/i/blocks/j/<leaf>`` (block ``j``) becomes ``levels/i/blocks/<leaf>``, the
  blocks' arrays stacked on a new leading axis; every other leaf is kept as is (the same
  object). Exact: values are only copied.

  Args:
    tree: the parameters of an unrolled ``InternImage`` (``nnx.state(backbone, nnx.Param)``,
      or its ``nnx.to_pure_dict``: a nested dict with int indices), or of the multi-task
      model (paths ``backbone/levels/...``; the heads' leaves are kept). Leaves may be
      Variables, numpy or jax arrays, or ``jax.ShapeDtypeStruct``.

  Returns:
    The same kind of tree (``nnx.State`` or nested dict).

  Raises:
    ValueError: if the blocks of a level do not all hold the same leaves.
  """
  return stacking.stack(tree, BLOCK_LISTS)


def unstack_blocks(tree: nnx.State | Mapping) -> nnx.State | dict:
  """The inverse of `stack_blocks`: ``levels/i/blocks/<leaf>`` [depth, ...] -> per block.

  ``unstack_blocks(stack_blocks(p))`` equals ``p`` exactly, leaf order included.
  """
  return stacking.unstack(tree, BLOCK_LISTS)
