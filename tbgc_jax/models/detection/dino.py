"""DINO detection head (Zhang et al. 2022, "DINO: DETR with Improved DeNoising Anchor Boxes").

Multi-scale deformable encoder over projected backbone levels (plus extra stride-2 levels),
mixed query selection (top-k encoder proposals give anchor boxes, content queries are
learned), a decoder with iterative box refinement and look-forward-twice, and contrastive
denoising (CDN) queries in training. Every shape is fixed by the config and the batch's
padded sizes, so a jitted step compiles once.

Conventions: boxes in the batch are xyxy pixels of the network input; inside the head they
are normalised cxcywh relative to the valid image (``image_hw``). Feature maps are NHWC,
padded bottom/right like the image.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tbgc_jax.models import stacking
from tbgc_jax.models.deform_attn import MSDeformAttn
from tbgc_jax.models.detection.losses import match_predictions, set_prediction_losses
from tbgc_jax.models.layers import MLP
from tbgc_jax.ops.boxes import (
  box_cxcywh_to_xyxy,
  box_xyxy_to_cxcywh,
  inverse_sigmoid,
)

CHALLENGE_NUM_CLASSES = 45  # TT100K classes of the CVPR 2023 foundation-model challenge

# The encoder's and decoder's layer lists, in a head's tree or the multi-task model's.
LAYER_LISTS: tuple[stacking.ListPattern, ...] = (
    ("encoder",), ("decoder",), ("heads", "det", "encoder"), ("heads", "det", "decoder"))


@dataclasses.dataclass(frozen=True)
class DINOConfig:
  """Sizes and loss settings of `DINOHead` (defaults: the challenge baseline).

  Attributes:
    hidden_dim: model width.
    num_queries: matching queries (top-k encoder proposals).
    num_denoising: DINO's ``dn_number``: ``max(2 num_denoising, 2 N)`` fixed query slots
      (``N`` padded targets per image) hold ``max(1, num_denoising // m)`` groups of ``m``
      positive + ``m`` negative queries, ``m`` the batch's real maximum of boxes per image
      (`denoising_layout`).
    num_encoder_layers, num_decoder_layers: depths.
    num_heads: attention heads; num_points: deformable sampling points per head and level.
    ffn_dim: feed-forward width; dropout: dropout rate (NNX "dropout" stream).
    feature_levels: which backbone outputs (0..3 = strides 4..32) are projected.
    num_extra_levels: extra levels made by stride-2 3x3 convs on top (DINO: 1, stride 64).
    norm_groups: GroupNorm groups of the input projections.
    label_noise_ratio, box_noise_scale: CDN noise (DINO: 0.5, 1.0).
    num_select: top-k detections returned by `predict`.
    focal_alpha, focal_gamma: focal loss parameters.
    cost_class, cost_bbox, cost_giou: Hungarian matching cost weights.
    loss_class, loss_bbox, loss_giou: loss weights (same for every decoder layer, the
      encoder proposals and the denoising queries).
    pos_temperature: temperature of the encoder's sine positional embedding.
    scan_layers: store the encoder's and the decoder's layers stacked (``encoder/<leaf>``,
      ``decoder/<leaf>`` with a leading layer axis; `stack_layers`) and run each stack under
      ``jax.lax.scan``: the traced and compiled program holds one layer of each whatever the
      depths. Needs ``dropout == 0``.
  """

  hidden_dim: int = 256
  num_queries: int = 900
  num_denoising: int = 100
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 2048
  dropout: float = 0.0
  feature_levels: tuple[int, ...] = (1, 2, 3)
  num_extra_levels: int = 1
  norm_groups: int = 32
  label_noise_ratio: float = 0.5
  box_noise_scale: float = 1.0
  num_select: int = 100
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  cost_class: float = 2.0
  cost_bbox: float = 5.0
  cost_giou: float = 2.0
  loss_class: float = 1.0
  loss_bbox: float = 5.0
  loss_giou: float = 2.0
  pos_temperature: float = 20.0
  scan_layers: bool = False


# "challenge": the challenge baseline (900 queries, 100 denoising queries, 6/6 layers, width
# 256, 8 heads, 4 points, 4 levels at strides 8-64; use with
# ``num_classes=CHALLENGE_NUM_CLASSES``). "tiny": a CPU-sized setting for tests and the overfit
# benchmark.
PRESETS: dict[str, DINOConfig] = {
    "challenge": DINOConfig(),
    "tiny": DINOConfig(hidden_dim=32, num_queries=20, num_denoising=16, num_encoder_layers=1,
                       num_decoder_layers=2, num_heads=2, num_points=2, ffn_dim=64,
                       norm_groups=8, num_select=20),
}


def _sine_embed(coords: jax.Array, num_feats: int, temperature: float) -> jax.Array:
  """Sine/cosine features of each coordinate, concatenated: ``[..., n] -> [..., n * F]``."""
  dim_t = temperature ** (2.0 * (np.arange(num_feats) // 2) / num_feats)
  x = coords[..., None] / jnp.asarray(dim_t, coords.dtype)
  x = jnp.stack([jnp.sin(x[..., 0::2]), jnp.cos(x[..., 1::2])], -1)
  return x.reshape(*coords.shape[:-1], coords.shape[-1] * num_feats)


class DenoisingLayout(NamedTuple):
  """Where the contrastive denoising queries sit in their fixed slots.

  Attributes:
    groups: int32 scalar, active groups ``max(1, num_denoising // m)`` for the batch's real
      maximum number of boxes per image ``m`` (1 when ``m == 0``).
    group: ``[S]`` int32 group of each slot (``slot // (2 m)``).
    target: ``[S]`` int32 target index of each slot within its image.
    is_neg: ``[S]`` bool, negative (far-noised) query.
    active: ``[B, S]`` bool, slot of an active group whose target is a real box.
  """

  groups: jax.Array
  group: jax.Array
  target: jax.Array
  is_neg: jax.Array
  active: jax.Array


def denoising_layout(target_valid: jax.Array, num_denoising: int) -> DenoisingLayout:
  """Contrastive-denoising groups for a fixed query budget and the batch's real box count.

  DINO makes ``2 * dn_number // (2 m)`` groups of ``m`` positive then ``m`` negative queries,
  ``m`` the largest number of boxes of an image in the batch (one group when that is 0 or
  the budget is smaller than one group). Here the budget is ``S = max(2 * num_denoising,
  2 N)`` fixed slots (``N`` padded targets per image, so one group always fits); the group
  size and count are traced values and the slots past the last group, or of padded targets,
  are inactive. One compile serves every box count. (For ``dn_number < 50`` the official
  code keeps ``2 dn_number`` groups whatever the box count, a size no fixed budget can hold;
  the rule above is the one it applies at its default ``dn_number = 100``.)

  Args:
    target_valid: ``[B, N]`` bool, real targets (padding False).
    num_denoising: the official ``dn_number`` (challenge: 100, i.e. up to 200 queries).

  Returns:
    A `DenoisingLayout`.

  References:
    IDEA-Research/DINO, ``models/dino/dn_components.py``, ``prepare_for_cdn`` (``dn_number``,
    ``single_pad``, ``pad_size`` and the group-blocked ``attn_mask``).
  """
  b, n = target_valid.shape
  slots = max(2 * num_denoising, 2 * n)
  # Real box count: last real index + 1 (equals the count when targets are packed first).
  m = jnp.max(jnp.where(target_valid, jnp.arange(1, n + 1, dtype=jnp.int32), 0))
  size = jnp.maximum(m, 1)
  groups = jnp.where(m > 0, jnp.maximum((2 * num_denoising) // (2 * size), 1), 1)
  groups = groups.astype(jnp.int32)
  s = jnp.arange(slots, dtype=jnp.int32)
  group = s // (2 * size)
  within = s % (2 * size)
  is_neg = within >= size
  target = jnp.minimum(within % size, n - 1)
  real = jnp.take_along_axis(target_valid, jnp.broadcast_to(target[None], (b, slots)), axis=1)
  active = (group < groups)[None] & real
  return DenoisingLayout(groups, group, target, is_neg, active)


class _FFN(nnx.Module):
  """Post-norm feed-forward block with residual."""

  def __init__(self, dim: int, ffn_dim: int, dropout: float, *, rngs: nnx.Rngs):
    self.lin1 = nnx.Linear(dim, ffn_dim, rngs=rngs)
    self.lin2 = nnx.Linear(ffn_dim, dim, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(x + self.drop(self.lin2(self.drop(jax.nn.relu(self.lin1(x))))))


def _split_levels(x: jax.Array, shapes: Sequence[tuple[int, int]]) -> list[jax.Array]:
  out, start = [], 0
  for h, w in shapes:
    out.append(x[:, start:start + h * w].reshape(x.shape[0], h, w, x.shape[-1]))
    start += h * w
  return out


class _EncoderLayer(nnx.Module):
  def __init__(self, cfg: DINOConfig, num_levels: int, *, rngs: nnx.Rngs):
    d = cfg.hidden_dim
    self.attn = MSDeformAttn(d, num_levels, cfg.num_heads, cfg.num_points, rngs=rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.ffn = _FFN(d, cfg.ffn_dim, cfg.dropout, rngs=rngs)

  def __call__(self, src, pos, ref, shapes, masks):
    attn = self.attn(src + pos, ref, _split_levels(src, shapes), masks)
    return self.ffn(self.norm(src + self.drop(attn)))


class _DecoderLayer(nnx.Module):
  def __init__(self, cfg: DINOConfig, num_levels: int, *, rngs: nnx.Rngs):
    d = cfg.hidden_dim
    self.self_attn = nnx.MultiHeadAttention(
        cfg.num_heads, d, dropout_rate=cfg.dropout, decode=False, rngs=rngs)
    self.norm_self = nnx.LayerNorm(d, rngs=rngs)
    self.cross_attn = MSDeformAttn(d, num_levels, cfg.num_heads, cfg.num_points, rngs=rngs)
    self.norm_cross = nnx.LayerNorm(d, rngs=rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.ffn = _FFN(d, cfg.ffn_dim, cfg.dropout, rngs=rngs)

  def __call__(self, tgt, query_pos, ref, values, masks, attn_mask):
    q = tgt + query_pos
    tgt = self.norm_self(tgt + self.drop(self.self_attn(q, q, tgt, mask=attn_mask)))
    cross = self.cross_attn(tgt + query_pos, ref, values, masks)
    return self.ffn(self.norm_cross(tgt + self.drop(cross)))


class DINOHead(nnx.Module):
  """DINO detection head on multi-scale backbone features.

  Args:
    in_channels: channels of the 4 backbone outputs (strides 4, 8, 16, 32).
    num_classes: detection classes (labels in ``[0, num_classes)``).
    config: sizes and loss settings; ``PRESETS["challenge"]`` by default.
    rngs: NNX rngs ("params", and "dropout" when ``config.dropout > 0``).
  """

  def __init__(self, in_channels: Sequence[int], num_classes: int,
               config: DINOConfig | None = None, *, rngs: nnx.Rngs):
    cfg = config if config is not None else PRESETS["challenge"]
    for lv in cfg.feature_levels:
      if not 0 <= lv < len(in_channels):
        raise ValueError(f"DINOConfig.feature_levels={cfg.feature_levels} indexes outside the "
                         f"{len(in_channels)} backbone levels")
    if cfg.hidden_dim % cfg.norm_groups:
      raise ValueError(f"DINOConfig.hidden_dim={cfg.hidden_dim} is not divisible by "
                       f"norm_groups={cfg.norm_groups}")
    if cfg.scan_layers and cfg.dropout:
      raise ValueError(f"DINOConfig.scan_layers=True needs dropout=0, got {cfg.dropout}")
    self.config = cfg
    self.num_classes = num_classes
    d = cfg.hidden_dim
    self.num_levels = len(cfg.feature_levels) + cfg.num_extra_levels
    proj_convs, proj_norms = [], []
    for lv in cfg.feature_levels:
      proj_convs.append(nnx.Conv(in_channels[lv], d, (1, 1), rngs=rngs))
      proj_norms.append(nnx.GroupNorm(d, cfg.norm_groups, rngs=rngs))
    for i in range(cfg.num_extra_levels):
      c_in = in_channels[cfg.feature_levels[-1]] if i == 0 else d
      proj_convs.append(nnx.Conv(c_in, d, (3, 3), strides=2, padding=1, rngs=rngs))
      proj_norms.append(nnx.GroupNorm(d, cfg.norm_groups, rngs=rngs))
    self.proj_convs = nnx.List(proj_convs)
    self.proj_norms = nnx.List(proj_norms)
    self.level_embed = nnx.Param(
        nnx.initializers.normal(1.0)(rngs.params(), (self.num_levels, d)))
    self.encoder = stacking.layer_list(
        [_EncoderLayer(cfg, self.num_levels, rngs=rngs) for _ in range(cfg.num_encoder_layers)],
        cfg.scan_layers)
    prior_bias = nnx.initializers.constant(-math.log((1 - 0.01) / 0.01))
    self.enc_output = nnx.Linear(d, d, rngs=rngs)
    self.enc_output_norm = nnx.LayerNorm(d, rngs=rngs)
    self.enc_class = nnx.Linear(d, num_classes, bias_init=prior_bias, rngs=rngs)
    self.enc_bbox = MLP((d, d, d, 4), zero_last=True, rngs=rngs)
    self.tgt_embed = nnx.Embed(cfg.num_queries, d, rngs=rngs)
    self.label_enc = nnx.Embed(num_classes + 1, d, rngs=rngs)
    self.ref_point_head = MLP((2 * d, d, d), rngs=rngs)
    self.decoder = stacking.layer_list(
        [_DecoderLayer(cfg, self.num_levels, rngs=rngs) for _ in range(cfg.num_decoder_layers)],
        cfg.scan_layers)
    self.decoder_norm = nnx.LayerNorm(d, rngs=rngs)
    # Class and box heads shared by the decoder layers (DINO's default).
    self.class_embed = nnx.Linear(d, num_classes, bias_init=prior_bias, rngs=rngs)
    self.bbox_embed = MLP((d, d, d, 4), zero_last=True, rngs=rngs)

  # --- encoder -------------------------------------------------------------------------

  def _valid_hw(self, batch: dict) -> tuple[jax.Array, tuple[int, int]]:
    """Valid (h, w) per example as float, and the padded input size."""
    ref = batch["image_mask"] if "image_mask" in batch else batch["image"]
    size = (ref.shape[1], ref.shape[2])
    hw = jnp.asarray(batch["image_hw"], jnp.float32)
    ok = jnp.all(hw > 0, axis=-1, keepdims=True)
    if "valid" in batch:
      ok = ok & jnp.asarray(batch["valid"])[:, None]
    return jnp.where(ok, hw, jnp.asarray(size, jnp.float32)), size

  def _encode(self, features: Sequence[jax.Array], batch: dict):
    cfg = self.config
    if len(features) < max(cfg.feature_levels) + 1:
      raise ValueError(f"DINOHead got {len(features)} feature maps, config.feature_levels="
                       f"{cfg.feature_levels}")
    hw, size = self._valid_hw(batch)
    ratio = hw / jnp.asarray(size, jnp.float32)  # [B, 2] (h, w) share of the padded input
    srcs = []
    for i, lv in enumerate(cfg.feature_levels):
      srcs.append(self.proj_norms[i](self.proj_convs[i](features[lv].astype(jnp.float32))))
    x = features[cfg.feature_levels[-1]].astype(jnp.float32)
    for i in range(cfg.num_extra_levels):
      j = len(cfg.feature_levels) + i
      x = self.proj_norms[j](self.proj_convs[j](x))
      srcs.append(x)
    shapes = [(s.shape[1], s.shape[2]) for s in srcs]
    masks, flat, pos, centres, props, mflat = [], [], [], [], [], []
    two_pi = 2.0 * math.pi
    for lvl, (s, (h, w)) in enumerate(zip(srcs, shapes, strict=True)):
      vh = jnp.ceil(ratio[:, 0] * h)  # valid rows / cols of this level
      vw = jnp.ceil(ratio[:, 1] * w)
      m = ((jnp.arange(h)[None, :, None] < vh[:, None, None])
           & (jnp.arange(w)[None, None, :] < vw[:, None, None]))
      masks.append(m)
      ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                            jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
      # Token centres normalised to the valid region (x, y).
      cx = xs[None] / (ratio[:, 1, None, None] * w)
      cy = ys[None] / (ratio[:, 0, None, None] * h)
      pe = _sine_embed(jnp.stack([cy, cx], -1) * two_pi, cfg.hidden_dim // 2,
                       cfg.pos_temperature)
      b = s.shape[0]
      flat.append(s.reshape(b, h * w, -1))
      pos.append(pe.reshape(b, h * w, -1) + self.level_embed[...][lvl])
      centres.append(jnp.stack([xs / w, ys / h], -1).reshape(1, h * w, 2))
      wh = jnp.full_like(cx, 0.05 * 2.0 ** lvl)
      props.append(jnp.stack([cx, cy, wh, wh], -1).reshape(b, h * w, 4))
      mflat.append(m.reshape(b, h * w))
    src = jnp.concatenate(flat, 1)
    pos = jnp.concatenate(pos, 1)
    # Encoder reference points: each token's centre in full-map normalised coordinates,
    # the same point on every level (MSDeformAttn reads the padded maps).
    ref = jnp.broadcast_to(jnp.concatenate(centres, 1)[:, :, None, :],
                           (src.shape[0], src.shape[1], self.num_levels, 2))
    src, _ = stacking.run(
        self.encoder, lambda layer, x: (layer(x, pos, ref, shapes, masks), None), src)
    return src, shapes, masks, jnp.concatenate(props, 1), jnp.concatenate(mflat, 1), ratio

  def _select_queries(self, memory, proposals, token_mask):
    """Two-stage query selection: top-k encoder proposals become the decoder's anchors."""
    cfg = self.config
    if memory.shape[1] < cfg.num_queries:
      raise ValueError(f"DINOHead: {memory.shape[1]} encoder tokens < num_queries="
                       f"{cfg.num_queries}; use a larger input or fewer queries")
    ok = token_mask & jnp.all((proposals > 0.01) & (proposals < 0.99), -1)
    prop_unact = jnp.where(ok[..., None], inverse_sigmoid(proposals), 0.0)
    out = jnp.where(ok[..., None], memory, 0.0)
    out = self.enc_output_norm(self.enc_output(out))
    logits = self.enc_class(out)
    coord_unact = self.enc_bbox(out) + prop_unact
    score = jnp.where(ok, logits.max(-1), -1e9)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(score), cfg.num_queries)
    enc_logits = jnp.take_along_axis(logits, idx[..., None], axis=1)
    enc_coord_unact = jnp.take_along_axis(coord_unact, idx[..., None], axis=1)
    return enc_logits, enc_coord_unact

  # --- decoder -------------------------------------------------------------------------

  def _decode(self, tgt, ref_unact, memory, shapes, masks, ratio, attn_mask):
    """Runs the decoder; returns ``(logits [L, B, T, K], boxes [L, B, T, 4])``, every
    layer's predictions, with look-forward-twice.

    Each layer's boxes are ``bbox_embed(norm(out)) + inverse_sigmoid(prev)`` (``prev`` the
    previous layer's undetached refinement); the next reference is
    ``sigmoid(bbox_embed(out) + inverse_sigmoid(ref))`` on the output *before* the final norm,
    detached.

    References:
      IDEA-Research/DINO, ``models/dino/deformable_transformer.py``,
      ``TransformerDecoder.forward`` ("iter update": ``delta_unsig =
      self.bbox_embed[layer_id](output)``, then ``intermediate.append(self.norm(output))``)
      and ``models/dino/dino.py``, ``DINO.forward`` (``layer_bbox_embed(layer_hs) +
      inverse_sigmoid(layer_ref_sig)`` on the normed ``hs``).
    """
    values = _split_levels(memory, shapes)
    scale = jnp.concatenate([ratio[:, ::-1], ratio[:, ::-1]], -1)[:, None, :]  # (w, h, w, h)
    ref = jax.nn.sigmoid(jax.lax.stop_gradient(ref_unact))

    def step(layer, carry):
      tgt, ref, prev = carry  # prev: the previous layer's (undetached) refined boxes
      ref_in = ref * scale
      sine = _sine_embed(ref_in * (2.0 * math.pi), self.config.hidden_dim // 2, 10000.0)
      query_pos = self.ref_point_head(sine)
      ref_levels = jnp.broadcast_to(ref_in[:, :, None, :],
                                    (*ref_in.shape[:2], self.num_levels, 4))
      tgt = layer(tgt, query_pos, ref_levels, values, masks, attn_mask)
      hs = self.decoder_norm(tgt)
      # Look forward twice: this layer's box loss also trains the previous layer's refinement.
      boxes = jax.nn.sigmoid(self.bbox_embed(hs) + inverse_sigmoid(prev))
      # The reference update reads the decoder output before the final norm (official
      # deformable_transformer.py, TransformerDecoder.forward: bbox_embed(output), then
      # intermediate.append(self.norm(output))); the returned boxes read the normed one.
      prev = jax.nn.sigmoid(self.bbox_embed(tgt) + inverse_sigmoid(ref))
      return (tgt, jax.lax.stop_gradient(prev), prev), (self.class_embed(hs), boxes)

    return stacking.run(self.decoder, step, (tgt, ref, ref))[1]

  def _denoising(self, boxes, labels, target_valid, rng):
    """Contrastive denoising queries from noised ground truth (fixed slots, dynamic groups).

    Returns ``(tgt, ref_unact, target_of_dn, dn_active, groups, attn_mask)``: the queries'
    content ``[B, S, C]`` and unsigmoided boxes ``[B, S, 4]``, each slot's target index
    (``-1`` for negatives and inactive slots) ``[B, S]``, the active slots ``[B, S]``, the
    number of active groups (int32 scalar) and the self-attention mask ``[B, 1, T, T]``
    (True = may attend) over ``T = S + num_queries`` queries.
    """
    cfg = self.config
    b = labels.shape[0]
    layout = denoising_layout(target_valid, cfg.num_denoising)
    num_dn = layout.target.shape[0]
    k_flip, k_lab, k_sign, k_part = jax.random.split(rng, 4)
    index = jnp.broadcast_to(layout.target[None], (b, num_dn))
    rep_labels = jnp.take_along_axis(labels, index, axis=1)
    rep_boxes = jnp.take_along_axis(boxes, index[..., None], axis=1)
    flip = jax.random.uniform(k_flip, (b, num_dn)) < cfg.label_noise_ratio * 0.5
    noisy_labels = jnp.where(flip, jax.random.randint(k_lab, (b, num_dn), 0, self.num_classes),
                             rep_labels)
    xyxy = box_cxcywh_to_xyxy(rep_boxes)
    half = jnp.concatenate([rep_boxes[..., 2:], rep_boxes[..., 2:]], -1) * 0.5
    sign = jax.random.randint(k_sign, (b, num_dn, 4), 0, 2).astype(jnp.float32) * 2.0 - 1.0
    part = (jax.random.uniform(k_part, (b, num_dn, 4))
            + layout.is_neg.astype(jnp.float32)[None, :, None])
    xyxy = jnp.clip(xyxy + sign * part * half * cfg.box_noise_scale, 0.0, 1.0)
    ref_unact = inverse_sigmoid(box_xyxy_to_cxcywh(xyxy))
    tgt = self.label_enc(noisy_labels)
    active = layout.active
    target_of_dn = jnp.where(active & ~layout.is_neg[None], index, -1)
    # Attention mask (True = may attend): matching queries never see denoising queries,
    # denoising groups never see each other, inactive slots are hidden from everyone.
    total = num_dn + cfg.num_queries
    group = jnp.concatenate([layout.group, jnp.full((cfg.num_queries,), -1, jnp.int32)])
    allowed = (group[None, :] == group[:, None]) | (group[None, :] < 0)
    key_ok = jnp.concatenate([active, jnp.ones((b, cfg.num_queries), bool)], 1)
    mask = (allowed[None] & key_ok[:, None, :]) | jnp.eye(total, dtype=bool)[None]
    return tgt, ref_unact, target_of_dn, active, layout.groups, mask[:, None]

  def _content_queries(self, b: int) -> jax.Array:
    """Learned content queries (mixed query selection), ``[B, num_queries, C]``."""
    emb = self.tgt_embed.embedding[...]
    return jnp.broadcast_to(emb[None], (b, *emb.shape))

  # --- public API ----------------------------------------------------------------------

  def _targets(self, batch: dict, hw: jax.Array):
    wh = jnp.concatenate([hw[:, ::-1], hw[:, ::-1]], -1)[:, None, :]
    boxes = box_xyxy_to_cxcywh(jnp.asarray(batch["boxes"], jnp.float32) / wh)
    valid = jnp.asarray(batch["box_mask"], bool)
    if "valid" in batch:
      valid = valid & jnp.asarray(batch["valid"], bool)[:, None]
    # Padded targets get a harmless unit box (finite costs and losses everywhere).
    boxes = jnp.where(valid[..., None], boxes, jnp.asarray([0.5, 0.5, 1.0, 1.0]))
    labels = jnp.where(valid, jnp.asarray(batch["labels"], jnp.int32), 0)
    return boxes, labels, valid

  def loss(self, features: Sequence[jax.Array], batch: dict,
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss: matched focal/L1/GIoU on every decoder layer, encoder proposals and
    denoising queries, each normalised by the number of valid boxes in the batch.

    Args:
      features: backbone feature maps (NHWC, strides 4-32).
      batch: a "det" batch (``image_mask``/``image``, ``image_hw``, ``boxes``, ``labels``,
        ``box_mask``, optional ``valid``).
      rng: key for the denoising noise.

    Returns:
      ``(total, diagnostics)``; diagnostics hold the last layer's unweighted ``loss_ce``,
      ``loss_bbox``, ``loss_giou``, the weighted sums ``loss_aux`` (earlier decoder layers),
      ``loss_enc`` (encoder proposals), ``loss_dn`` (denoising, all layers) and ``num_boxes``.
    """
    cfg = self.config
    memory, shapes, masks, proposals, token_mask, ratio = self._encode(features, batch)
    enc_logits, enc_coord_unact = self._select_queries(memory, proposals, token_mask)
    hw, _ = self._valid_hw(batch)
    tboxes, tlabels, tvalid = self._targets(batch, hw)
    b = tboxes.shape[0]
    dn_tgt, dn_ref, target_of_dn, dn_valid, groups, attn_mask = self._denoising(
        tboxes, tlabels, tvalid, rng)
    tgt = self._content_queries(b)
    num_dn = dn_tgt.shape[1]
    logits, boxes = self._decode(jnp.concatenate([dn_tgt, tgt], 1),
                                 jnp.concatenate([dn_ref, enc_coord_unact], 1),
                                 memory, shapes, masks, ratio, attn_mask)
    num_layers = logits.shape[0]
    num_boxes = jnp.maximum(tvalid.sum().astype(jnp.float32), 1.0)
    ex_valid = (jnp.asarray(batch["valid"], jnp.float32) if "valid" in batch
                else jnp.ones((b,), jnp.float32))
    query_w = jnp.broadcast_to(ex_valid[:, None], (b, cfg.num_queries))

    def weighted(parts):
      return (cfg.loss_class * parts["loss_ce"] + cfg.loss_bbox * parts["loss_bbox"]
              + cfg.loss_giou * parts["loss_giou"])

    # All matchings (every decoder layer and the encoder proposals) in one vmapped Hungarian
    # call, and the losses of every set vmapped: one copy of each to compile whatever the
    # number of layers.
    set_logits = jnp.concatenate([logits[:, :, num_dn:], enc_logits[None]], 0)
    set_boxes = jnp.concatenate([boxes[:, :, num_dn:],
                                 jax.nn.sigmoid(enc_coord_unact)[None]], 0)
    n_sets = num_layers + 1
    tile = lambda x: jnp.concatenate([x] * n_sets, 0)
    flat = lambda x: x.reshape(n_sets * b, *x.shape[2:])
    toq = match_predictions(flat(set_logits), flat(set_boxes), tile(tlabels), tile(tboxes),
                            tile(tvalid), cfg.cost_class, cfg.cost_bbox, cfg.cost_giou,
                            cfg.focal_alpha, cfg.focal_gamma).reshape(n_sets, b, -1)
    set_losses = jax.vmap(
        lambda lg, bx, t: set_prediction_losses(lg, bx, tlabels, tboxes, t, query_w, num_boxes,
                                                cfg.focal_alpha, cfg.focal_gamma))
    parts = set_losses(set_logits, set_boxes, toq)  # {name: [L + 1]}, encoder last
    dn_weight = dn_valid.astype(jnp.float32)
    dn_parts = jax.vmap(
        lambda lg, bx: set_prediction_losses(
            lg, bx, tlabels, tboxes, target_of_dn, dn_weight,
            num_boxes * groups.astype(jnp.float32), cfg.focal_alpha, cfg.focal_gamma))(
                logits[:, :, :num_dn], boxes[:, :, :num_dn])
    per_set = weighted(parts)
    loss_last = per_set[num_layers - 1]
    loss_aux = jnp.sum(per_set[:num_layers - 1])
    loss_enc = per_set[num_layers]
    loss_dn = jnp.sum(weighted(dn_parts))
    total = loss_last + loss_aux + loss_enc + loss_dn
    diag = {name: v[num_layers - 1] for name, v in parts.items()}
    diag.update(loss_aux=loss_aux, loss_enc=loss_enc, loss_dn=loss_dn, num_boxes=num_boxes)
    return total.astype(jnp.float32), diag

  def predict(self, features: Sequence[jax.Array], batch: dict) -> dict[str, jax.Array]:
    """Top-k detections over (query, class) pairs of the last decoder layer.

    Args:
      features: backbone feature maps.
      batch: needs ``image_hw`` and ``image_mask`` (or ``image``).

    Returns:
      ``scores`` float32 ``[B, k]`` (sigmoid, descending), ``labels`` int32 ``[B, k]``,
      ``boxes`` float32 ``[B, k, 4]`` xyxy in pixels of the network input
      (``k = config.num_select``); map them to the original image with `rescale_boxes`.
    """
    cfg = self.config
    memory, shapes, masks, proposals, token_mask, ratio = self._encode(features, batch)
    _, enc_coord_unact = self._select_queries(memory, proposals, token_mask)
    b = memory.shape[0]
    tgt = self._content_queries(b)
    logits, boxes = jax.tree.map(
        lambda v: v[-1], self._decode(tgt, enc_coord_unact, memory, shapes, masks, ratio, None))
    k = min(cfg.num_select, logits.shape[1] * logits.shape[2])
    scores, idx = jax.lax.top_k(jax.nn.sigmoid(logits).reshape(b, -1), k)
    labels = (idx % self.num_classes).astype(jnp.int32)
    query = idx // self.num_classes
    boxes = jnp.take_along_axis(boxes, query[..., None], axis=1)
    hw, _ = self._valid_hw(batch)
    wh = jnp.concatenate([hw[:, ::-1], hw[:, ::-1]], -1)[:, None, :]
    return {"scores": scores, "labels": labels, "boxes": box_cxcywh_to_xyxy(boxes) * wh}


def stack_layers(tree: nnx.State | Mapping) -> nnx.State | dict:
  """Parameters of an unrolled head -> those of the ``scan_layers`` head: ``encoder/<j>/...``
  and ``decoder/<j>/...`` become ``encoder/...``, ``decoder/...`` with a leading layer axis.

  ``tree``: an ``nnx.State`` or nested dict of a `DINOHead` or of the multi-task model
  (``heads/det/...``; every other leaf is kept as is). Exact (`stacking.stack`).
  """
  return stacking.stack(tree, LAYER_LISTS)


def unstack_layers(tree: nnx.State | Mapping) -> nnx.State | dict:
  """The inverse of `stack_layers`."""
  return stacking.unstack(tree, LAYER_LISTS)
