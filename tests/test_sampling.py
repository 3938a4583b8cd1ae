"""Bilinear sampling and deformable attention against independent references."""

import numpy as np
import pytest
import scipy.ndimage
from jax.test_util import check_grads

from tbgc_jax.ops import bilinear_sample, ms_deform_attn


def test_bilinear_sample_matches_scipy_map_coordinates():
  rng = np.random.default_rng(0)
  value = rng.normal(size=(2, 5, 7, 3)).astype(np.float64)
  # Points inside, on the border, and well outside the map.
  xy = rng.uniform(-2.0, 8.0, size=(2, 40, 2))
  got = np.asarray(bilinear_sample(value.astype(np.float32), xy.astype(np.float32)))
  want = np.empty((2, 40, 3))
  for n in range(2):
    for c in range(3):
      want[n, :, c] = scipy.ndimage.map_coordinates(
          value[n, :, :, c], [xy[n, :, 1], xy[n, :, 0]], order=1, mode="grid-constant", cval=0.0
      )
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_bilinear_sample_gradients():
  rng = np.random.default_rng(1)
  value = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  # Keep points away from integer coordinates, where bilinear sampling has kinks.
  xy = np.floor(rng.uniform(-1.0, 4.0, size=(1, 6, 2))) + rng.uniform(0.2, 0.8, size=(1, 6, 2))
  xy = xy.astype(np.float32)
  check_grads(bilinear_sample, (value, xy), order=1, modes=["rev"], eps=1e-4)


def _naive_ms_deform_attn(values, loc, attn):
  b, q, m, num_levels, p, _ = loc.shape
  d = values[0].shape[-1]
  out = np.zeros((b, q, m, d))
  for bi in range(b):
    for qi in range(q):
      for mi in range(m):
        for li in range(num_levels):
          v = values[li][bi, :, :, mi]
          h, w = v.shape[:2]
          for pi in range(p):
            x = loc[bi, qi, mi, li, pi, 0] * w - 0.5
            y = loc[bi, qi, mi, li, pi, 1] * h - 0.5
            s = [
                scipy.ndimage.map_coordinates(v[:, :, c], [[y], [x]], order=1, mode="grid-constant")
                for c in range(d)
            ]
            out[bi, qi, mi] += attn[bi, qi, mi, li, pi] * np.concatenate(s)
  return out.reshape(b, q, m * d)


@pytest.mark.parametrize("shapes", [((6, 8), (3, 4)), ((5, 5), (3, 3), (2, 1))])
def test_ms_deform_attn_matches_naive_loops(shapes):
  rng = np.random.default_rng(2)
  b, q, m, d, p = 2, 3, 2, 4, 3
  values = [rng.normal(size=(b, h, w, m, d)) for h, w in shapes]
  loc = rng.uniform(-0.1, 1.1, size=(b, q, m, len(shapes), p, 2))
  attn = rng.uniform(size=(b, q, m, len(shapes), p))
  got = ms_deform_attn([v.astype(np.float32) for v in values], loc.astype(np.float32),
                       attn.astype(np.float32))
  np.testing.assert_allclose(np.asarray(got), _naive_ms_deform_attn(values, loc, attn), atol=1e-5)


def test_ms_deform_attn_rejects_level_mismatch():
  with pytest.raises(ValueError, match="value levels"):
    ms_deform_attn([np.zeros((1, 2, 2, 1, 1), np.float32)], np.zeros((1, 1, 1, 2, 1, 2)),
                   np.zeros((1, 1, 1, 2, 1)))
