"""DCNv3 core against an independent loop implementation of the official formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads
from scipy import ndimage

from tbgc_jax.models.dcnv3 import DCNv3, dcnv3_core


def _naive_dcnv3(value, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, scale):
  """The official reference, re-derived: pad, normalised grid_sample coordinates, loops."""
  n, _, _, c = value.shape
  padded = np.pad(value, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  h_in, w_in = padded.shape[1:3]
  h_out = (h_in - (dh * (kh - 1) + 1)) // sh + 1
  w_out = (w_in - (dw * (kw - 1) + 1)) // sw + 1
  num_points = kh * kw
  cg = c // group
  out = np.zeros((n, h_out, w_out, c), np.float64)
  for b in range(n):
    for g in range(group):
      rows, cols, weights, where = [], [], [], []
      for i in range(h_out):
        for j in range(w_out):
          p = 0
          for kx in range(kw):  # official meshgrid(x, y): x slowest
            for ky in range(kh):
              ref_x = ((dw * (kw - 1)) // 2 + 0.5 + j * sw) / w_in
              ref_y = ((dh * (kh - 1)) // 2 + 0.5 + i * sh) / h_in
              grid_x = (-((dw * (kw - 1)) // 2) + kx * dw) / w_in
              grid_y = (-((dh * (kh - 1)) // 2) + ky * dh) / h_in
              o = (g * num_points + p) * 2
              loc_x = ref_x + grid_x * scale + offset[b, i, j, o] * scale / w_in
              loc_y = ref_y + grid_y * scale + offset[b, i, j, o + 1] * scale / h_in
              # grid_sample(align_corners=False): u in [0, 1] -> pixel u * size - 0.5.
              cols.append(loc_x * w_in - 0.5)
              rows.append(loc_y * h_in - 0.5)
              weights.append(mask[b, i, j, g * num_points + p])
              where.append((i, j))
              p += 1
      coords = np.array([rows, cols])
      for cc in range(g * cg, (g + 1) * cg):
        vals = ndimage.map_coordinates(
            padded[b, :, :, cc].astype(np.float64), coords, order=1, mode="grid-constant",
            cval=0.0)
        for (i, j), wgt, v in zip(where, weights, vals, strict=True):
          out[b, i, j, cc] += wgt * v
  return out


CASES = [
    # kernel, stride, pad, dilation, group, offset_scale, (h, w)
    ((3, 3), (1, 1), (1, 1), (1, 1), 2, 1.0, (5, 6)),
    ((3, 3), (2, 2), (2, 2), (2, 2), 1, 2.0, (7, 6)),
    ((3, 2), (1, 2), (1, 0), (1, 1), 3, 0.5, (4, 5)),
]


@pytest.mark.parametrize("kernel,stride,pad,dil,group,scale,hw", CASES)
def test_core_matches_naive(kernel, stride, pad, dil, group, scale, hw):
  rng = np.random.default_rng(0)
  kh, kw = kernel
  n, c = 2, 2 * group
  h_out = (hw[0] + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
  w_out = (hw[1] + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
  num_points = kh * kw
  value = rng.normal(size=(n, *hw, c)).astype(np.float32)
  offset = (2.0 * rng.normal(size=(n, h_out, w_out, group * num_points * 2))).astype(np.float32)
  mask = rng.uniform(size=(n, h_out, w_out, group * num_points)).astype(np.float32)
  core = functools.partial(
      dcnv3_core, kernel_size=kernel, stride=stride, pad=pad, dilation=dil, group=group,
      offset_scale=scale)
  got = jax.jit(core)(value, offset, mask)
  want = _naive_dcnv3(value, offset, mask, kh, kw, *stride, *pad, *dil, group, scale)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_core_shape_errors():
  value = jnp.zeros((1, 4, 4, 4))
  with pytest.raises(ValueError, match="expected offset"):
    dcnv3_core(value, jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4, 4, 18)), group=2)
  with pytest.raises(ValueError, match="not divisible"):
    dcnv3_core(value, jnp.zeros((1, 4, 4, 54)), jnp.zeros((1, 4, 4, 27)), group=3)


def test_core_gradients():
  rng = np.random.default_rng(1)
  n, h, w, group = 1, 4, 4, 2
  value = jnp.asarray(rng.normal(size=(n, h, w, 4)), jnp.float32)
  # Keep sampling points away from pixel centres: bilinear is only piecewise smooth.
  frac = rng.uniform(0.25, 0.75, size=(n, h, w, group * 18))
  offset = jnp.asarray(rng.integers(-2, 2, size=frac.shape) + frac, jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(n, h, w, group * 9)), jnp.float32)
  f = jax.jit(lambda v, o, m: dcnv3_core(v, o, m, group=group))
  check_grads(f, (value, offset, mask), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_module_at_init_is_box_filter():
  """Zero-initialised offsets and mask: DCNv3 = output_proj(3x3 mean of input_proj(x))."""
  layer = DCNv3(6, group=3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  got = jax.jit(lambda m, x: m(x))(layer, x)
  proj = layer.input_proj
  value = np.asarray(x, np.float64) @ np.asarray(proj.kernel[...]) + np.asarray(proj.bias[...])
  box = ndimage.uniform_filter(value, size=(1, 3, 3, 1), mode="constant", cval=0.0)
  want = box @ np.asarray(layer.output_proj.kernel[...]) + np.asarray(layer.output_proj.bias[...])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-4)
