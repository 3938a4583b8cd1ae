"""Small layers shared by the heads."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx


class MLP(nnx.Module):
  """Linear layers with ReLU between them (none after the last).

  Args:
    dims: widths ``(in, hidden..., out)``; ``len(dims) - 1`` layers.
    zero_last: start the last layer's kernel at zero (DINO's box-refinement heads, so the
      first refinement leaves the reference boxes unchanged).
  """

  def __init__(self, dims: Sequence[int], zero_last: bool = False, *, rngs: nnx.Rngs):
    if len(dims) < 2:
      raise ValueError(f"MLP needs at least (in, out) dims, got {tuple(dims)}")
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
      last = i == len(dims) - 2
      init = nnx.initializers.zeros if (last and zero_last) else nnx.initializers.lecun_normal()
      layers.append(nnx.Linear(a, b, kernel_init=init, rngs=rngs))
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x
