"""Random streams for building large models under a trace (`nnx.eval_shape`, `jax.jit`).

Every ``rngs.params()`` call of flax 0.12 writes its stream's counter back with
``count[...] += 1``. Under a trace that counter is a tracer, and the write compares its
``sharding`` with the old one; a tracer's ``sharding`` raises an error whose message is built
eagerly by walking every equation traced so far. Building a model is therefore quadratic in
its size: ``nnx.eval_shape`` of the challenge model (InternImage-T, DINO 6 + 6, Mask2Former
6 + 9 layers; 1,341 counter writes) took 48 s on a 2-core CPU, 44 s of it in those messages,
and the trainer traces the build twice. `construction_rngs` keeps the counters on the host
(numpy): they advance as plain numbers, nothing traced is written, the build takes about a
second, and the keys (``fold_in(key, count)``) and so the parameters are bit for bit the
same as with ``nnx.Rngs(seed)``.

>>> from flax import nnx
>>> a = nnx.Linear(2, 3, rngs=nnx.Rngs(0)).kernel[...]
>>> b = nnx.Linear(2, 3, rngs=construction_rngs(0)).kernel[...]
>>> bool((a == b).all())
True
"""

import numpy as np
from flax import nnx


class _HostCounter(np.ndarray):
  """A numpy counter whose reads are copies, so a key folded from a read never changes."""

  def __getitem__(self, index):
    return np.asarray(self)[index].copy()


def construction_rngs(seed: int, **streams: int) -> nnx.Rngs:
  """``nnx.Rngs(seed, **streams)`` whose streams count on the host.

  Use it to build a model (the trainer does); the model's own streams (dropout, drop path)
  are forked from it and count on the device as usual.
  """
  rngs = nnx.Rngs(seed, **streams)
  for stream in vars(rngs).values():
    if isinstance(stream, nnx.RngStream):
      count = np.zeros(stream.count.shape, np.uint32).view(_HostCounter)
      stream.count = nnx.RngCount(count, tag=stream.tag)
  return rngs
