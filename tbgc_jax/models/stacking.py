"""Repeated layers stored stacked and run under ``jax.lax.scan``, and the layout converters.

A model that runs ``L`` identical layers one after the other traces, lowers and compiles
``L`` copies of the layer. Built with its layers *stacked* (one module whose parameters carry
a leading layer axis, `stack_modules`) and run under ``jax.lax.scan`` (`split_stacked`), it
holds one copy whatever ``L``. The layers are first built one by one, drawing the same keys
in the same order as the unrolled model, so a stacked model holds exactly the stacked
parameters of the unrolled model of the same seed.

Parameter paths then change from ``<list>/<j>/<leaf>`` to ``<list>/<leaf>`` (shape
``[L, ...]``): `stack` and `unstack` convert between the two layouts, given the lists'
paths as patterns (`ListPattern`). The backbone (`tbgc_jax.models.internimage.stack_blocks`)
and the heads (``stack_layers`` of `tbgc_jax.models.detection.dino` and
`tbgc_jax.models.segmentation.head`) name theirs.

  >>> import numpy as np
  >>> unrolled = {"encoder": {0: {"w": np.zeros(2)}, 1: {"w": np.ones(2)}}, "norm": np.ones(2)}
  >>> stacked = stack(unrolled, [("encoder",)])
  >>> stacked["encoder"]["w"].shape
  (2, 2)
  >>> sorted(unstack(stacked, [("encoder",)])["encoder"])
  [0, 1]
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

# The path of a list of layers from the root of a parameter tree: keys, with None standing for
# any list index (e.g. ``("levels", None, "blocks")``: every level's blocks).
ListPattern = tuple[str | int | None, ...]


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """One module of the same type whose every variable stacks the modules' on a leading axis.

  The modules must have the same structure and hold only arrays that stack (parameters,
  batch statistics), not rng streams: `flax.nnx.reseed` refuses a stream whose key is stacked
  (drop the streams of rate-0 dropouts first, `drop_rng_streams`).

  Raises:
    ValueError: if the modules hold rng streams or differ in structure.
  """
  graphdef = nnx.graphdef(modules[0])
  rng = nnx.state(modules[0], nnx.RngState)
  if jax.tree.leaves(rng):
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(rng)]
    raise ValueError(f"stack_modules: the layers hold rng streams ({', '.join(paths)}), "
                     "which cannot be stacked")
  for i, module in enumerate(modules[1:], 1):
    if nnx.graphdef(module) != graphdef:
      raise ValueError(f"stack_modules: layer {i} differs in structure from layer 0")
  states = [nnx.state(m) for m in modules]
  return nnx.merge(graphdef, jax.tree.map(lambda *v: jnp.stack(v), *states))


def drop_rng_streams(module: nnx.Module) -> nnx.Module:
  """Removes the rng streams of ``module``'s rate-0 `nnx.Dropout` layers (never drawn from).

  Raises:
    ValueError: if a dropout layer has a non-zero rate.
  """
  for path, m in nnx.iter_modules(module):
    if isinstance(m, nnx.Dropout) and m.rngs is not None:
      if m.rate != 0.0:
        raise ValueError(f"{'/'.join(map(str, path))}: dropout rate {m.rate} in a layer to be "
                         "stacked; stacked layers support dropout 0 only")
      m.rngs = None
  return module


def split_stacked(module: nnx.Module, num: int | None = None,
                  groups: int = 1) -> tuple[nnx.GraphDef, Any]:
  """``(graphdef, state)`` of a stacked module for ``jax.lax.scan``.

  Args:
    module: built by `stack_modules`.
    num: use the first ``num`` layers only (all when None).
    groups: reshape the layer axis to ``[num // groups, groups]``, so that one scan step
      runs ``groups`` consecutive layers (``num`` must be a multiple of ``groups``).

  Returns:
    The layer's graphdef and the stacked state; ``nnx.merge(graphdef, state_of_layer)`` is
    one layer.
  """
  graphdef, state = nnx.split(module)
  if num is not None:
    state = jax.tree.map(lambda v: v[:num], state)
  if groups > 1:
    state = jax.tree.map(lambda v: v.reshape(v.shape[0] // groups, groups, *v.shape[1:]),
                         state)
  return graphdef, state


def layer_state(state: Any, index: int) -> Any:
  """Layer ``index`` of a stacked state (the leading axis)."""
  return jax.tree.map(lambda v: v[index], state)


def layer_at(stacked: nnx.Module, index: int) -> nnx.Module:
  """Layer ``index`` of a stacked module, as a module of its own."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, layer_state(state, index))


def scan(stacked: nnx.Module, fn: Callable, carry: Any, xs: Any = None, *,
         num: int | None = None, groups: int = 1) -> tuple[Any, Any]:
  """``jax.lax.scan`` of ``fn(layer, carry, x) -> (carry, y)`` over stacked layers.

  Args:
    stacked: built by `stack_modules`.
    fn: one step; ``layer`` is one layer (a module), or a list of ``groups`` consecutive
      layers when ``groups > 1``.
    carry: the initial carry.
    xs: per-step inputs scanned beside the layers (leading axis: the number of steps), or
      None.
    num, groups: as in `split_stacked`.

  Returns:
    ``(carry, ys)``, ``ys`` stacked over the steps.
  """
  graphdef, state = split_stacked(stacked, num, groups)

  def body(c, inputs):
    s, x = inputs
    if groups > 1:
      layer = [nnx.merge(graphdef, layer_state(s, g)) for g in range(groups)]
    else:
      layer = nnx.merge(graphdef, s)
    return fn(layer, c, x)

  return jax.lax.scan(body, carry, (state, xs))


def layer_list(layers: Sequence[nnx.Module], stacked: bool) -> nnx.Module:
  """The layers as an ``nnx.List``, or, with ``stacked``, as one module (`stack_modules`,
  after dropping the rate-0 dropouts' rng streams) for `run` to scan over. No layers: an
  empty list either way."""
  if not stacked or not layers:
    return nnx.List(layers)
  return stack_modules([drop_rng_streams(layer) for layer in layers])


def num_layers(layers: nnx.Module) -> int:
  """The number of layers of a `layer_list`, listed or stacked."""
  if isinstance(layers, nnx.List):
    return len(layers)
  return int(jax.tree.leaves(nnx.state(layers))[0].shape[0])


def run(layers: nnx.Module, step: Callable, carry: Any) -> tuple[Any, Any]:
  """``step(layer, carry) -> (carry, y)`` over the layers of `layer_list`, in order.

  A list runs as a Python loop, a stacked module under ``jax.lax.scan``; both return
  ``(carry, ys)`` with the ``ys`` stacked on a leading layer axis (None when ``step`` returns
  None).
  """
  if not isinstance(layers, nnx.List):
    return scan(layers, lambda layer, c, _: step(layer, c), carry)
  ys = []
  for layer in layers:
    carry, y = step(layer, carry)
    ys.append(y)
  if not ys or ys[0] is None:
    return carry, None
  return carry, jax.tree.map(lambda *v: jnp.stack(v), *ys)


def _split_path(path: tuple, patterns: Sequence[ListPattern]
                ) -> tuple[tuple, int | None, tuple] | None:
  """``(list path, layer index or None when stacked, rest)``, or None outside the lists."""
  for pattern in patterns:
    n = len(pattern)
    if len(path) <= n:
      continue
    if all((p is None and isinstance(k, int)) or p == k
           for p, k in zip(pattern, path[:n], strict=True)):
      if isinstance(path[n], int):
        return path[:n], path[n], path[n + 1:]
      return path[:n], None, path[n:]
  return None


def _stack_leaves(leaves: Sequence):
  first = leaves[0]
  if isinstance(first, nnx.Variable):
    return first.replace(_stack_leaves([v.get_value() for v in leaves]))
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
  if all(isinstance(v, np.ndarray) for v in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _unstack_leaf(leaf, depth: int) -> list:
  if isinstance(leaf, nnx.Variable):
    return [leaf.replace(v) for v in _unstack_leaf(leaf.get_value(), depth)]
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)] * depth
  return [leaf[j] for j in range(depth)]


def stack_flat(flat: Mapping[tuple, Any], patterns: Sequence[ListPattern]) -> dict[tuple, Any]:
  """`stack` on a flat ``{path tuple: leaf}`` mapping (paths as in ``nnx.State``)."""
  groups: dict[tuple, dict[tuple, dict[int, Any]]] = {}
  out: dict[tuple, Any] = {}
  for path, leaf in flat.items():
    parts = _split_path(path, patterns)
    if parts is None or parts[1] is None:
      out[path] = leaf
      continue
    prefix, j, rest = parts
    layers = groups.setdefault(prefix, {})
    if not layers:
      out[prefix] = None  # placeholder: the stacked leaves go where the first layer was
    layers.setdefault(rest, {})[j] = leaf
  for prefix, layers in groups.items():
    depth = 1 + max(max(per) for per in layers.values())
    for rest, per in layers.items():
      if sorted(per) != list(range(depth)):
        raise ValueError(f"{'/'.join(map(str, prefix + rest))}: layers {sorted(per)}, "
                         f"expected 0..{depth - 1} (every layer must have every leaf)")
  result: dict[tuple, Any] = {}
  for path, leaf in out.items():
    if path in groups:
      for rest, per in groups[path].items():
        result[path + rest] = _stack_leaves([per[j] for j in range(len(per))])
    else:
      result[path] = leaf
  return result


def unstack_flat(flat: Mapping[tuple, Any], patterns: Sequence[ListPattern]
                 ) -> dict[tuple, Any]:
  """`unstack` on a flat ``{path tuple: leaf}`` mapping (paths as in ``nnx.State``)."""
  groups: dict[tuple, dict[tuple, Any]] = {}
  out: dict[tuple, Any] = {}
  for path, leaf in flat.items():
    parts = _split_path(path, patterns)
    if parts is None or parts[1] is not None:
      out[path] = leaf
      continue
    prefix, _, rest = parts
    if prefix not in groups:
      groups[prefix] = {}
      out[prefix] = None  # placeholder: the layers go where the stacked leaves were
    groups[prefix][rest] = leaf
  result: dict[tuple, Any] = {}
  for path, leaf in out.items():
    if path not in groups:
      result[path] = leaf
      continue
    layers = groups[path]
    depths = {int(np.shape(v.get_value() if isinstance(v, nnx.Variable) else v)[0])
              for v in layers.values()}
    if len(depths) != 1:
      raise ValueError(f"{'/'.join(map(str, path))}: stacked leaves disagree on the number "
                       f"of layers: {sorted(depths)}")
    depth = depths.pop()
    split = {rest: _unstack_leaf(leaf, depth) for rest, leaf in layers.items()}
    for j in range(depth):
      for rest, leaves in split.items():
        result[(*path, j, *rest)] = leaves[j]
  return result


def _convert(tree, flat_fn: Callable[[Mapping[tuple, Any]], dict[tuple, Any]]):
  if isinstance(tree, nnx.State):
    return nnx.from_flat_state(list(flat_fn(dict(nnx.to_flat_state(tree))).items()))
  return traverse_util.unflatten_dict(flat_fn(traverse_util.flatten_dict(dict(tree))))


def stack(tree: nnx.State | Mapping, patterns: Sequence[ListPattern]) -> nnx.State | dict:
  """Unrolled parameters -> stacked: each ``<list>/<j>/<leaf>`` of a list matched by
  ``patterns`` becomes ``<list>/<leaf>``, the layers' arrays stacked on a new leading axis.

  Every other leaf is kept as is (the same object). Exact: values are only copied.

  Args:
    tree: an ``nnx.State`` or its ``nnx.to_pure_dict`` (a nested dict with int indices).
      Leaves may be Variables, numpy or jax arrays, or ``jax.ShapeDtypeStruct``.
    patterns: the lists' paths from the root of ``tree`` (`ListPattern`).

  Returns:
    The same kind of tree (``nnx.State`` or nested dict).

  Raises:
    ValueError: if the layers of a list do not all hold the same leaves.
  """
  return _convert(tree, lambda flat: stack_flat(flat, patterns))


def unstack(tree: nnx.State | Mapping, patterns: Sequence[ListPattern]) -> nnx.State | dict:
  """The inverse of `stack`: ``<list>/<leaf>`` ``[L, ...]`` -> ``<list>/<j>/<leaf>``.

  ``unstack(stack(p, patterns), patterns)`` equals ``p`` exactly, leaf order included.
  """
  return _convert(tree, lambda flat: unstack_flat(flat, patterns))
