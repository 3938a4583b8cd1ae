"""Mask2Former semantic-segmentation head in Flax NNX (Cheng et al., 2022), fixed shapes.

Pixel decoder: the backbone's stride-8/16/32 maps are projected to ``hidden_dim`` and refined
jointly by multi-scale deformable-attention encoder layers (`MSDeformAttn`, shared with
detection); an FPN-style lateral fusion of the stride-4 map with the upsampled stride-8 output
gives the per-pixel mask features. Transformer decoder: learned query features and
positions, ``num_decoder_layers`` layers of (masked cross-attention to one scale, cycling
stride 32 -> 16 -> 8; self-attention; FFN), post-norm as in the original; each query attends
only where the previous prediction's mask is >= 0.5 (a query whose mask is empty at that
scale attends everywhere). Class and mask predictions come from the initial queries and
after every layer (deep supervision: ``num_decoder_layers + 1`` outputs).

Dropout is 0 in the original configuration and is left out here.

Shapes, traced abstractly (no weights are drawn):

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> cfg = PRESETS["tiny"]
>>> head = nnx.eval_shape(lambda: Mask2FormerHead((8, 8, 8, 8), 19, cfg, rngs=nnx.Rngs(0)))
>>> feats = [jax.ShapeDtypeStruct((1, 64 // s, 64 // s, 8), jnp.float32) for s in (4, 8, 16, 32)]
>>> image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
>>> nnx.eval_shape(lambda h, f, x: h.predict(f, {"image": x}), head, feats, image)["seg"].shape
(1, 64, 64)
"""

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tbgc_jax.models import stacking
from tbgc_jax.models.deform_attn import MSDeformAttn
from tbgc_jax.models.layers import MLP
from tbgc_jax.models.segmentation.losses import mask2former_loss

CHALLENGE_NUM_CLASSES = 19  # BDD100K semantic classes of the CVPR 2023 foundation-model challenge

# The pixel decoder's and the transformer decoder's layer lists, in a head's tree or the
# multi-task model's.
LAYER_LISTS: tuple[stacking.ListPattern, ...] = (
    ("pixel_decoder", "layers"), ("layers",),
    ("heads", "seg", "pixel_decoder", "layers"), ("heads", "seg", "layers"))


@dataclasses.dataclass(frozen=True)
class Mask2FormerConfig:
  """Sizes and loss settings of `Mask2FormerHead` (defaults: the official semantic setting).

  Attributes:
    hidden_dim: width of pixel decoder and transformer decoder.
    mask_dim: width of mask features / mask embeddings.
    num_queries: queries (must be >= the head's ``num_classes``).
    num_decoder_layers: masked-attention layers (cycling over the three scales).
    num_heads: decoder attention heads.
    decoder_ffn_dim: decoder FFN width.
    num_encoder_layers, encoder_ffn_dim, encoder_heads, encoder_points: pixel decoder.
    num_points: ``K`` sampled points for matching and mask losses.
    oversample_ratio, importance_ratio: importance sampling of loss points.
    no_object_weight: cross-entropy weight of the no-object class.
    class_weight, mask_weight, dice_weight: loss weights, also the matcher's costs.
    scan_layers: store the pixel decoder's and the transformer decoder's layers stacked
      (``pixel_decoder/layers/<leaf>``, ``layers/<leaf>`` with a leading layer axis;
      `stack_layers`) and run them under ``jax.lax.scan`` (the decoder's in steps of three
      layers, one per memory scale): the compiled program holds one encoder layer and three
      decoder layers whatever the depths.
  """

  hidden_dim: int = 256
  mask_dim: int = 256
  num_queries: int = 100
  num_decoder_layers: int = 9
  num_heads: int = 8
  decoder_ffn_dim: int = 2048
  num_encoder_layers: int = 6
  encoder_ffn_dim: int = 1024
  encoder_heads: int = 8
  encoder_points: int = 4
  num_points: int = 12544
  oversample_ratio: float = 3.0
  importance_ratio: float = 0.75
  no_object_weight: float = 0.1
  class_weight: float = 2.0
  mask_weight: float = 5.0
  dice_weight: float = 5.0
  scan_layers: bool = False


# "challenge": the official Mask2Former semantic setting the challenge uses (BDD100K, use with
# ``num_classes=CHALLENGE_NUM_CLASSES``). "tiny": a few-hundred-kB head for CPU tests and the
# overfit benchmark (same structure).
PRESETS: dict[str, Mask2FormerConfig] = {
    "challenge": Mask2FormerConfig(),
    "tiny": Mask2FormerConfig(
        hidden_dim=32, mask_dim=32, num_queries=20, num_decoder_layers=3, num_heads=4,
        decoder_ffn_dim=64, num_encoder_layers=1, encoder_ffn_dim=64, encoder_heads=4,
        encoder_points=2, num_points=256),
}


def _sine_position(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
  """DETR's normalised 2-D sine embedding ``[h, w, dim]`` (``dim / 2`` for y, then x)."""
  half = dim // 2
  y = (np.arange(1, h + 1, dtype=np.float64) / (h + 1e-6)) * 2 * np.pi
  x = (np.arange(1, w + 1, dtype=np.float64) / (w + 1e-6)) * 2 * np.pi
  dim_t = temperature ** (2 * (np.arange(half) // 2) / half)

  def embed(v):
    p = v[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], -1).reshape(len(v), -1)

  py = np.broadcast_to(embed(y)[:, None, :], (h, w, half))
  px = np.broadcast_to(embed(x)[None, :, :], (h, w, half))
  return np.concatenate([py, px], -1).astype(np.float32)


def _resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of ``[B, h, w, C]`` like ``F.interpolate(align_corners=False)``."""
  if x.shape[1:3] == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), "bilinear", antialias=False)


def _level_mask(image_mask: jax.Array | None, hw: tuple[int, int]) -> jax.Array | None:
  if image_mask is None:
    return None
  m = jax.image.resize(image_mask.astype(jnp.float32), (image_mask.shape[0], *hw), "nearest")
  return m > 0.5


def _groups(dim: int) -> int:
  return min(32, dim)


def attention_mask(mask_logits: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Masked attention's "attend" mask from the previous layer's mask prediction.

  Args:
    mask_logits: ``[B, h, w, Q]`` mask logits resized to the attended level.
    valid: optional ``[B, h, w]`` bool, False on image padding.

  Returns:
    ``[B, Q, h * w]`` bool, True where the query attends: pixels whose mask probability is
    >= 0.5 (and valid); a query with no such pixel attends to every valid pixel (the original's
    fix against an all-masked softmax).
  """
  b, h, w, q = mask_logits.shape
  attend = (mask_logits >= 0.0).reshape(b, h * w, q).transpose(0, 2, 1)
  if valid is None:
    everywhere = jnp.ones_like(attend)
  else:
    everywhere = jnp.broadcast_to(valid.reshape(b, 1, h * w), attend.shape)
  attend &= everywhere
  return jnp.where(attend.any(-1, keepdims=True), attend, everywhere)


class _ConvNorm(nnx.Module):
  """Conv + GroupNorm (+ ReLU), the pixel decoder's building block."""

  def __init__(self, cin: int, cout: int, kernel: int, relu: bool, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), use_bias=False,
                         kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
    self.norm = nnx.GroupNorm(cout, num_groups=_groups(cout), rngs=rngs)
    self.relu = relu

  def __call__(self, x):
    x = self.norm(self.conv(x))
    return jax.nn.relu(x) if self.relu else x


class _FFN(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x)))


class _EncoderLayer(nnx.Module):
  def __init__(self, dim, ffn_dim, heads, points, *, rngs):
    self.attn = MSDeformAttn(dim, 3, heads, points, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.ffn = _FFN(dim, ffn_dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, src, pos, ref, shapes, masks):
    b = src.shape[0]
    values, start = [], 0
    for h, w in shapes:
      values.append(src[:, start:start + h * w].reshape(b, h, w, -1))
      start += h * w
    src = self.norm1(src + self.attn(src + pos, ref, values, masks))
    return self.norm2(src + self.ffn(src))


class PixelDecoder(nnx.Module):
  """Multi-scale deformable-attention pixel decoder with FPN fusion into stride 4.

  Args:
    in_channels: channels of the backbone maps at strides 4, 8, 16, 32.
    hidden_dim: width of the decoder (and of the multi-scale outputs).
    mask_dim: width of the per-pixel mask features.
    num_layers: deformable encoder layers.
    ffn_dim: encoder FFN width.
    num_heads, num_points: deformable attention heads and points per level.
    scan_layers: stack the encoder layers and run them under ``jax.lax.scan``.
    rngs: NNX rngs.
  """

  def __init__(self, in_channels: Sequence[int], hidden_dim: int, mask_dim: int,
               num_layers: int, ffn_dim: int, num_heads: int, num_points: int,
               scan_layers: bool = False, *, rngs: nnx.Rngs):
    if len(in_channels) != 4:
      raise ValueError(f"PixelDecoder expects 4 input maps (strides 4..32), got {in_channels}")
    # Encoder levels run from the coarsest (stride 32) to stride 8, as in Mask2Former.
    self.input_proj = nnx.List([_ConvNorm(c, hidden_dim, 1, False, rngs=rngs)
                                for c in in_channels[:0:-1]])
    self.level_embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (3, hidden_dim)))
    self.layers = stacking.layer_list(
        [_EncoderLayer(hidden_dim, ffn_dim, num_heads, num_points, rngs=rngs)
         for _ in range(num_layers)], scan_layers)
    self.lateral = _ConvNorm(in_channels[0], hidden_dim, 1, False, rngs=rngs)
    self.output = _ConvNorm(hidden_dim, hidden_dim, 3, True, rngs=rngs)
    self.mask_features = nnx.Conv(hidden_dim, mask_dim, (1, 1),
                                  kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
    self.hidden_dim = hidden_dim

  def __call__(self, features: Sequence[jax.Array], image_mask: jax.Array | None = None):
    """Returns ``(mask_features [B, H/4, W/4, mask_dim], [stride 32, 16, 8] maps)``."""
    b = features[0].shape[0]
    d = self.hidden_dim
    srcs = [proj(f) for proj, f in zip(self.input_proj, features[:0:-1], strict=True)]
    shapes = [s.shape[1:3] for s in srcs]
    masks = None if image_mask is None else [_level_mask(image_mask, hw) for hw in shapes]
    pos, ref = [], []
    for i, (h, w) in enumerate(shapes):
      pos.append(jnp.asarray(_sine_position(h, w, d)).reshape(h * w, d) + self.level_embed[i])
      ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
      ref.append(np.stack([xs, ys], -1).reshape(h * w, 2))
    pos = jnp.broadcast_to(jnp.concatenate(pos)[None], (b, sum(h * w for h, w in shapes), d))
    ref = np.concatenate(ref).astype(np.float32)
    ref = jnp.broadcast_to(jnp.asarray(ref)[None, :, None, :], (b, ref.shape[0], 3, 2))
    x = jnp.concatenate([s.reshape(b, -1, d) for s in srcs], axis=1)
    x, _ = stacking.run(self.layers,
                        lambda layer, x: (layer(x, pos, ref, shapes, masks), None), x)
    outs, start = [], 0
    for h, w in shapes:
      outs.append(x[:, start:start + h * w].reshape(b, h, w, d))
      start += h * w
    y = self.lateral(features[0])
    y = self.output(y + _resize(outs[-1], y.shape[1:3]))
    return self.mask_features(y), outs


class _DecoderLayer(nnx.Module):
  def __init__(self, dim, heads, ffn_dim, *, rngs):
    mha = dict(num_heads=heads, in_features=dim, qkv_features=dim, out_features=dim,
               kernel_init=nnx.initializers.xavier_uniform(), decode=False, rngs=rngs)
    self.cross = nnx.MultiHeadAttention(**mha)
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.self_attn = nnx.MultiHeadAttention(**mha)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.ffn = _FFN(dim, ffn_dim, rngs=rngs)
    self.norm3 = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, x, query_pos, memory, memory_pos, attend):
    x = self.norm1(x + self.cross(x + query_pos, memory + memory_pos, memory,
                                  mask=attend[:, None]))
    q = x + query_pos
    x = self.norm2(x + self.self_attn(q, q, x))
    return self.norm3(x + self.ffn(x))


class Mask2FormerHead(nnx.Module):
  """Mask2Former semantic-segmentation head (task "seg").

  Args:
    in_channels: channels of the backbone maps at strides 4, 8, 16, 32.
    num_classes: semantic classes ``C`` (19 for BDD100K); predictions have ``C + 1`` logits.
    config: sizes and loss settings; ``PRESETS["challenge"]`` by default.
    rngs: NNX rngs.
  """

  def __init__(self, in_channels: Sequence[int], num_classes: int = CHALLENGE_NUM_CLASSES,
               config: Mask2FormerConfig | None = None, *, rngs: nnx.Rngs):
    cfg = config if config is not None else PRESETS["challenge"]
    if cfg.num_queries < num_classes:
      raise ValueError(f"Mask2FormerHead: num_queries={cfg.num_queries} < num_classes="
                       f"{num_classes}; every present class needs a query to match")
    self.config = cfg
    self.pixel_decoder = PixelDecoder(
        in_channels, cfg.hidden_dim, cfg.mask_dim, cfg.num_encoder_layers, cfg.encoder_ffn_dim,
        cfg.encoder_heads, cfg.encoder_points, cfg.scan_layers, rngs=rngs)
    init = nnx.initializers.normal(1.0)
    self.query_feat = nnx.Param(init(rngs.params(), (cfg.num_queries, cfg.hidden_dim)))
    self.query_pos = nnx.Param(init(rngs.params(), (cfg.num_queries, cfg.hidden_dim)))
    self.level_embed = nnx.Param(init(rngs.params(), (3, cfg.hidden_dim)))
    self.layers = stacking.layer_list(
        [_DecoderLayer(cfg.hidden_dim, cfg.num_heads, cfg.decoder_ffn_dim, rngs=rngs)
         for _ in range(cfg.num_decoder_layers)], cfg.scan_layers)
    self.decoder_norm = nnx.LayerNorm(cfg.hidden_dim, rngs=rngs)
    self.class_embed = nnx.Linear(cfg.hidden_dim, num_classes + 1, rngs=rngs)
    self.mask_embed = MLP((cfg.hidden_dim, cfg.hidden_dim, cfg.hidden_dim, cfg.mask_dim),
                          rngs=rngs)
    self.num_classes = num_classes
    self.hidden_dim = cfg.hidden_dim
    self.loss_kwargs = dict(
        num_points=cfg.num_points, oversample_ratio=cfg.oversample_ratio,
        importance_ratio=cfg.importance_ratio, no_object_weight=cfg.no_object_weight,
        cost_class=cfg.class_weight, cost_mask=cfg.mask_weight, cost_dice=cfg.dice_weight,
        weight_ce=cfg.class_weight, weight_mask=cfg.mask_weight, weight_dice=cfg.dice_weight)

  def _heads(self, x, mask_features, target_hw, level_valid):
    """Class logits, mask logits and the next layer's attend mask ``[B, Q, h*w]``."""
    x = self.decoder_norm(x)
    class_logits = self.class_embed(x)
    masks = jnp.einsum("bqc,bhwc->bqhw", self.mask_embed(x), mask_features)
    small = _resize(masks.transpose(0, 2, 3, 1), target_hw)
    attend = attention_mask(jax.lax.stop_gradient(small), level_valid)
    return class_logits, masks, attend

  def __call__(self, features: Sequence[jax.Array],
               image_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Runs the head.

    Args:
      features: 4 NHWC maps at strides 4, 8, 16, 32.
      image_mask: optional ``[B, H, W]`` bool, True on the valid (non-padding) image region.

    Returns:
      ``class_logits`` ``[L + 1, B, Q, C + 1]`` and ``mask_logits`` ``[L + 1, B, Q, H/4, W/4]``
      (index 0 from the initial queries, last = final prediction).
    """
    mask_features, ms = self.pixel_decoder(features, image_mask)
    b = mask_features.shape[0]
    d = self.hidden_dim
    memories, mem_pos, valid = [], [], []
    for i, m in enumerate(ms):
      h, w = m.shape[1:3]
      memories.append(m.reshape(b, h * w, d) + self.level_embed[i])
      mem_pos.append(jnp.asarray(_sine_position(h, w, d)).reshape(1, h * w, d))
      valid.append(_level_mask(image_mask, (h, w)))
    x = jnp.broadcast_to(self.query_feat[None], (b, *self.query_feat.shape))
    qpos = jnp.broadcast_to(self.query_pos[None], x.shape)
    cls, msk, attend = self._heads(x, mask_features, ms[0].shape[1:3], valid[0])

    def step(layer, i, x, attend):
      """Layer ``i``: cross-attention to scale ``i % 3``, then the predictions and the attend
      mask at the next layer's scale."""
      lv, nxt = i % 3, (i + 1) % 3
      x = layer(x, qpos, memories[lv], mem_pos[lv], attend)
      cls, msk, attend = self._heads(x, mask_features, ms[nxt].shape[1:3], valid[nxt])
      return x, attend, (cls, msk)

    outs = [(cls[None], msk[None])]
    num = self.config.num_decoder_layers
    if isinstance(self.layers, nnx.List):
      for i, layer in enumerate(self.layers):
        x, attend, out = step(layer, i, x, attend)
        outs.append(jax.tree.map(lambda v: v[None], out))
      done = num
    else:
      # Three layers per scan step, one per memory scale (their shapes differ); the attend
      # mask carried between steps is always at scale 0.
      def group(layers, carry, _):
        x, attend = carry
        ys = []
        for p, layer in enumerate(layers):
          x, attend, out = step(layer, p, x, attend)
          ys.append(out)
        return (x, attend), jax.tree.map(lambda *v: jnp.stack(v), *ys)

      done = num - num % 3
      if done:
        (x, attend), ys = stacking.scan(self.layers, group, (x, attend), num=done, groups=3)
        outs.append(jax.tree.map(lambda v: v.reshape(done, *v.shape[2:]), ys))
    for i in range(done, num):  # the layers past the last group of three
      x, attend, out = step(stacking.layer_at(self.layers, i), i, x, attend)
      outs.append(jax.tree.map(lambda v: v[None], out))
    all_cls, all_masks = (jnp.concatenate(v) for v in zip(*outs, strict=True))
    return {"class_logits": all_cls, "mask_logits": all_masks}

  def loss(self, features: Sequence[jax.Array], batch: dict,
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Deep-supervised Mask2Former loss on ``batch["label"]`` (255 ignored), see `losses`."""
    out = self(features, batch.get("image_mask"))
    f32 = lambda x: x.astype(jnp.float32)  # losses in float32 whatever the compute dtype
    return mask2former_loss(rng, f32(out["class_logits"]), f32(out["mask_logits"]), batch["label"],
                            batch["valid"], **self.loss_kwargs)

  def predict(self, features: Sequence[jax.Array], batch: dict,
              return_scores: bool = False) -> dict[str, jax.Array]:
    """Semantic inference at the input resolution.

    Scores per pixel and class are ``sum_q softmax(class_q)[c] * sigmoid(mask_q)``
    (no-object dropped; mask logits bilinearly upsampled from stride 4 first).

    Args:
      features: backbone maps.
      batch: needs ``image`` (for the input size ``[B, H, W, 3]``); ``image_mask`` is used if
        present.
      return_scores: also return ``seg_scores`` ``[B, H, W, C]``.

    Returns:
      ``{"seg": int32 [B, H, W]}`` (+ ``seg_scores``).
    """
    out = self(features, batch.get("image_mask"))
    hw = batch["image"].shape[1:3]
    probs = jax.nn.softmax(out["class_logits"][-1].astype(jnp.float32), -1)[..., :-1]
    masks = jax.nn.sigmoid(_resize(out["mask_logits"][-1].transpose(0, 2, 3, 1), hw))
    scores = jnp.einsum("bqc,bhwq->bhwc", probs, masks)
    result = {"seg": jnp.argmax(scores, -1).astype(jnp.int32)}
    if return_scores:
      result["seg_scores"] = scores
    return result


def stack_layers(tree: nnx.State | Mapping) -> nnx.State | dict:
  """Parameters of an unrolled head -> those of the ``scan_layers`` head:
  ``pixel_decoder/layers/<j>/...`` and ``layers/<j>/...`` become ``pixel_decoder/layers/...``
  and ``layers/...`` with a leading layer axis.

  ``tree``: an ``nnx.State`` or nested dict of a `Mask2FormerHead` or of the multi-task model
  (``heads/seg/...``; every other leaf is kept as is). Exact (`stacking.stack`).
  """
  return stacking.stack(tree, LAYER_LISTS)


def unstack_layers(tree: nnx.State | Mapping) -> nnx.State | dict:
  """The inverse of `stack_layers`."""
  return stacking.unstack(tree, LAYER_LISTS)
