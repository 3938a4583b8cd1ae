"""DCNv3, the deformable convolution at the core of InternImage, in pure JAX.

Semantics follow the official InternImage operator (``DCNv3`` module and its reference
``dcnv3_core_pytorch``): a 3x3 depthwise convolution (+ LayerNorm + GELU) of the input
predicts, per output pixel and per channel group, ``P = kh * kw`` sampling offsets and ``P``
modulation scalars softmax-normalised over the ``P`` points; the input-projected values are
read at the regular kernel grid plus the offsets (both scaled by ``offset_scale``) with
bilinear interpolation and zero padding, weighted by the modulation and summed; an output
projection follows.

Layouts match the official operator so that converted weights work unchanged:
``offset`` channels are ordered ``(group, point, xy)`` with ``x`` first, ``mask`` channels
``(group, point)``, and the ``P`` points of the kernel are ordered column-major (the kernel
column ``kx`` varies slowest: ``p = kx * kh + ky``), as produced by the official
``torch.meshgrid`` over (x, y).

The sampling uses the shared ``tbgc_jax.ops.bilinear_sample`` (gathers, no custom kernel).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tbgc_jax.ops.sampling import bilinear_sample


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  a, b = v
  return (int(a), int(b))


def dcnv3_output_size(
    size: int, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1
) -> int:
  """Output length of DCNv3 along one axis (same rule as a convolution)."""
  return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def dcnv3_sampling_points(
    out_hw: tuple[int, int],
    offset: jax.Array,
    *,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    pad: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    group: int,
    offset_scale: float = 1.0,
) -> jax.Array:
  """Sampling locations of DCNv3 in pixel units of the (unpadded) input.

  For output pixel ``(i, j)``, group ``g`` and kernel point ``(kx, ky)`` the location is
  ``x = j * stride - pad + c + (gx + offset_x) * offset_scale`` (likewise for ``y``), with
  ``c = dilation * (k - 1) // 2`` the centre of the dilated kernel and
  ``gx = -c + kx * dilation`` the regular grid.

  Args:
    out_hw: ``(H_out, W_out)``.
    offset: ``[N, H_out, W_out, group * P * 2]`` offsets in pixels, ordered
      ``(group, point, xy)``.
    kernel_size: ``k`` or ``(kh, kw)``.
    stride: ``s`` or ``(sh, sw)``.
    pad: ``p`` or ``(ph, pw)``.
    dilation: ``d`` or ``(dh, dw)``.
    group: number of channel groups.
    offset_scale: scale of both the regular grid and the offsets.

  Returns:
    ``[N, H_out, W_out, group, P, 2]`` points ``(x, y)`` where pixel ``(row i, col j)`` has
    its centre at ``x = j, y = i`` (the convention of ``bilinear_sample``).
  """
  kh, kw = _pair(kernel_size)
  sh, sw = _pair(stride)
  ph, pw = _pair(pad)
  dh, dw = _pair(dilation)
  h_out, w_out = out_hw
  n = offset.shape[0]
  num_points = kh * kw
  ch, cw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
  base_y = jnp.arange(h_out, dtype=jnp.float32) * sh - ph + ch
  base_x = jnp.arange(w_out, dtype=jnp.float32) * sw - pw + cw
  kx, ky = jnp.meshgrid(jnp.arange(kw), jnp.arange(kh), indexing="ij")  # p = kx * kh + ky
  grid_x = (-cw + kx.reshape(-1) * dw).astype(jnp.float32) * offset_scale
  grid_y = (-ch + ky.reshape(-1) * dh).astype(jnp.float32) * offset_scale
  off = offset.reshape(n, h_out, w_out, group, num_points, 2).astype(jnp.float32) * offset_scale
  x = base_x[None, None, :, None, None] + grid_x + off[..., 0]
  y = base_y[None, :, None, None, None] + grid_y + off[..., 1]
  return jnp.stack([x, y], axis=-1)


def dcnv3_core(
    value: jax.Array,
    offset: jax.Array,
    mask: jax.Array,
    *,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    pad: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    group: int,
    offset_scale: float = 1.0,
) -> jax.Array:
  """The DCNv3 operator without its projections (``dcnv3_core_pytorch`` semantics).

  Args:
    value: ``[N, H, W, C]`` input-projected features, ``C`` divisible by ``group``.
    offset: ``[N, H_out, W_out, group * P * 2]`` offsets in pixels (``P = kh * kw``).
    mask: ``[N, H_out, W_out, group * P]`` modulation (normally softmax-normalised over P).
    kernel_size: ``k`` or ``(kh, kw)``.
    stride: ``s`` or ``(sh, sw)``.
    pad: implicit zero padding ``p`` or ``(ph, pw)``.
    dilation: ``d`` or ``(dh, dw)``.
    group: number of channel groups; group ``g`` reads channels
      ``[g * C // group, (g + 1) * C // group)``.
    offset_scale: scale of the regular grid and of the offsets.

  Returns:
    ``[N, H_out, W_out, C]`` in the dtype of ``value``.

  Raises:
    ValueError: if ``C`` is not divisible by ``group`` or the offset/mask shapes do not match
      the output size implied by kernel, stride, padding and dilation.
  """
  kh, kw = _pair(kernel_size)
  n, h, w, c = value.shape
  if c % group:
    raise ValueError(f"dcnv3_core: channels {c} not divisible by group {group}")
  h_out = dcnv3_output_size(h, kh, _pair(stride)[0], _pair(pad)[0], _pair(dilation)[0])
  w_out = dcnv3_output_size(w, kw, _pair(stride)[1], _pair(pad)[1], _pair(dilation)[1])
  num_points = kh * kw
  want_offset = (n, h_out, w_out, group * num_points * 2)
  want_mask = (n, h_out, w_out, group * num_points)
  if offset.shape != want_offset or mask.shape != want_mask:
    raise ValueError(
        f"dcnv3_core: for value {value.shape}, kernel {(kh, kw)}, stride {stride}, pad {pad}, "
        f"dilation {dilation}, group {group} expected offset {want_offset} and mask "
        f"{want_mask}, got offset {offset.shape} and mask {mask.shape}")
  cg = c // group
  points = dcnv3_sampling_points(
      (h_out, w_out), offset, kernel_size=(kh, kw), stride=stride, pad=pad,
      dilation=dilation, group=group, offset_scale=offset_scale)
  # One sampling problem per (image, group): [N*G, H, W, Cg] read at [N*G, Ho*Wo*P] points.
  v = value.reshape(n, h, w, group, cg).transpose(0, 3, 1, 2, 4).reshape(n * group, h, w, cg)
  xy = points.transpose(0, 3, 1, 2, 4, 5).reshape(n * group, h_out * w_out * num_points, 2)
  sampled = bilinear_sample(v, xy).reshape(n, group, h_out, w_out, num_points, cg)
  m = mask.reshape(n, h_out, w_out, group, num_points).astype(sampled.dtype)
  out = jnp.einsum("nghwpc,nhwgp->nhwgc", sampled, m)
  return out.reshape(n, h_out, w_out, c).astype(value.dtype)


def depthwise_conv_by_shifts(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """``conv(x)`` of a stride-1 depthwise ``nnx.Conv`` (``feature_group_count`` = channels,
  symmetric integer padding, NHWC) as a sum of shifted products, with the conv's parameters.

  Element-wise only, so its gradients are too: inside ``jax.lax.scan`` XLA:CPU runs the
  grouped conv's kernel gradient about 18 times slower than outside (InternImage-T level 0,
  56x56x64), and this form about as fast as outside.
  """
  kh, kw = conv.kernel_size
  pad = conv.padding
  if (not isinstance(pad, int) or conv.strides not in (1, (1, 1))
      or conv.feature_group_count != conv.in_features):
    raise ValueError("depthwise_conv_by_shifts: needs a stride-1 depthwise conv with integer "
                     f"padding, got padding={pad!r}, strides={conv.strides!r}")
  kernel = conv.kernel[...]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  y = sum(xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(kh) for j in range(kw))
  if conv.bias is not None:
    y = y + conv.bias[...]
  return y


class DCNv3(nnx.Module):
  """DCNv3 layer as in InternImage (official ``DCNv3`` module, without the H/G-only options).

  Parameters mirror the official module: ``dw_conv`` (depthwise conv) and ``dw_norm``
  (LayerNorm, official ``dw_conv.1.1``), ``offset`` and ``mask`` (zero-initialised linears),
  ``input_proj`` and ``output_proj`` (Xavier-uniform linears). ``center_feature_scale`` and
  ``remove_center`` (only used by InternImage-H/G) are not implemented.
  """

  def __init__(
      self,
      channels: int,
      *,
      kernel_size: int = 3,
      dw_kernel_size: int | None = None,
      stride: int = 1,
      pad: int = 1,
      dilation: int = 1,
      group: int = 4,
      offset_scale: float = 1.0,
      rngs: nnx.Rngs,
  ):
    """Builds the layer.

    Args:
      channels: input and output channels, divisible by ``group``.
      kernel_size: sampling kernel size ``k`` (``P = k * k`` points per group).
      dw_kernel_size: kernel of the depthwise conv predicting offsets (default ``k``).
      stride: DCNv3 stride; the offsets are predicted at input resolution, so the output
        must have the input's size (InternImage uses stride 1, pad 1, dilation 1).
      pad: implicit zero padding.
      dilation: kernel dilation.
      group: number of channel groups, each with its own offsets and modulation.
      offset_scale: scale of the grid and offsets (1.0 for InternImage-T/S/B, 2.0 for L/XL).
      rngs: parameter initialisation keys.
    """
    if channels % group:
      raise ValueError(f"DCNv3: channels {channels} not divisible by group {group}")
    self.channels = channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.pad = pad
    self.dilation = dilation
    self.group = group
    self.offset_scale = offset_scale
    dwk = kernel_size if dw_kernel_size is None else dw_kernel_size
    num_points = kernel_size * kernel_size
    self.dw_conv = nnx.Conv(
        channels, channels, (dwk, dwk), padding=(dwk - 1) // 2, feature_group_count=channels,
        rngs=rngs)
    self.dw_norm = nnx.LayerNorm(channels, epsilon=1e-6, rngs=rngs)
    zeros = nnx.initializers.zeros_init()
    self.offset = nnx.Linear(
        channels, group * num_points * 2, kernel_init=zeros, bias_init=zeros, rngs=rngs)
    self.mask = nnx.Linear(
        channels, group * num_points, kernel_init=zeros, bias_init=zeros, rngs=rngs)
    xavier = nnx.initializers.xavier_uniform()
    self.input_proj = nnx.Linear(channels, channels, kernel_init=xavier, rngs=rngs)
    self.output_proj = nnx.Linear(channels, channels, kernel_init=xavier, rngs=rngs)

  def __call__(self, x: jax.Array, *, dw_conv_by_shifts: bool = False) -> jax.Array:
    """Applies DCNv3 to ``x`` ``[N, H, W, C]`` (channels last); returns the same layout.

    Args:
      x: the input.
      dw_conv_by_shifts: compute the depthwise conv as a sum of ``k * k`` shifted products
        (`depthwise_conv_by_shifts`; same parameters, same result up to float rounding)
        instead of a grouped ``conv_general_dilated``. For the scanned backbone: inside a
        loop XLA:CPU compiles the grouped conv's kernel gradient into a far slower program.
    """
    n, h, w, _ = x.shape
    value = self.input_proj(x)
    dw = depthwise_conv_by_shifts(self.dw_conv, x) if dw_conv_by_shifts else self.dw_conv(x)
    y = jax.nn.gelu(self.dw_norm(dw), approximate=False)
    offset = self.offset(y)
    mask = jax.nn.softmax(self.mask(y).reshape(n, h, w, self.group, -1), axis=-1)
    out = dcnv3_core(
        value, offset, mask.reshape(n, h, w, -1), kernel_size=self.kernel_size,
        stride=self.stride, pad=self.pad, dilation=self.dilation, group=self.group,
        offset_scale=self.offset_scale)
    return self.output_proj(out)
