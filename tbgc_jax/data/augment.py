"""Augmentation chains and the paper's multi-branch ``RandomChoice`` with a curriculum.

Chains are declared in configs as big_vision-style strings, transforms separated by ``|``
with keyword arguments as Python literals, e.g.
``"multiscale(long_edge=608, short_min=480, short_max=608)|hflip|autoaugment|noise"``
(names: ``tbgc_jax.data.transforms.REGISTRY``).

An augmentation config (``ConfigDict`` or dict) has ``mode``:
- ``"chain"``: one chain, ``chain`` (classification; also the Table 3 "parallel" baseline);
- ``"multi_branch"``: ``branches`` (one chain string each), ``probs_start`` and ``probs_end``:
  branch probabilities interpolated linearly in the training progress t = epoch/num_epochs,
  p(t) = (1 - t) p_start + t p_end (equal start and end: no curriculum).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from tbgc_jax.data.transforms import REGISTRY, Transform

Example = dict[str, Any]


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
  """Parses ``"name(k=v, ...)|name|..."`` into [(name, kwargs)] (values: Python literals)."""
  out = []
  for part in spec.split("|"):
    part = part.strip()
    if not part:
      continue
    try:
      node = ast.parse(part, mode="eval").body
    except SyntaxError as e:
      raise ValueError(f"augmentation spec {spec!r}: cannot parse {part!r}: {e}") from e
    if isinstance(node, ast.Name):
      name, kwargs = node.id, {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
      name = node.func.id
      kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    else:
      raise ValueError(f"augmentation spec {spec!r}: expected name or name(key=value, ...), "
                       f"got {part!r}")
    if name not in REGISTRY:
      raise ValueError(f"augmentation spec {spec!r}: unknown transform {name!r}; known: "
                       f"{sorted(REGISTRY)}")
    out.append((name, kwargs))
  return out


@dataclasses.dataclass(frozen=True)
class Chain(grain.transforms.RandomMap):
  """Applies transforms in order, all drawing from the same rng."""

  transforms: tuple[Transform, ...] = ()

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    for t in self.transforms:
      element = t.random_map(element, rng)
    return element

  @property
  def num_strong(self) -> int:
    return sum(t.strong for t in self.transforms)


def build_chain(spec: str, source: Any = None) -> Chain:
  """Builds a ``Chain`` from a spec string; ``source`` is given to Mosaic/MixUp."""
  ts = []
  for name, kwargs in parse_spec(spec):
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - fields
    if unknown:
      raise ValueError(f"augmentation {name!r}: unknown argument(s) {sorted(unknown)}; "
                       f"accepted: {sorted(fields - {'source'})}")
    for k, v in kwargs.items():
      if isinstance(v, list):
        kwargs[k] = tuple(v)
    if "source" in fields:
      kwargs["source"] = source
    ts.append(cls(**kwargs))
  return Chain(tuple(ts))


@dataclasses.dataclass(frozen=True)
class RandomChoice(grain.transforms.RandomMap):
  """Multi-branch augmentation: one branch per example, chosen with curriculum probabilities.

  The example's ``progress`` entry (training progress in [0, 1], default 0) selects the
  probabilities; the chosen branch index is written to ``branch``.
  """

  branches: tuple[Chain, ...] = ()
  probs_start: tuple[float, ...] = ()
  probs_end: tuple[float, ...] = ()

  def __post_init__(self):
    for name in ("probs_start", "probs_end"):
      p = np.asarray(getattr(self, name), np.float64)
      if p.shape != (len(self.branches),) or (p < 0).any() or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"RandomChoice.{name}: expected {len(self.branches)} non-negative "
                         f"probabilities summing to 1, got {getattr(self, name)}")

  def probs(self, progress: float) -> np.ndarray:
    """Branch probabilities at training progress ``progress`` (clipped to [0, 1])."""
    t = float(np.clip(progress, 0.0, 1.0))
    p = (1 - t) * np.asarray(self.probs_start) + t * np.asarray(self.probs_end)
    return p / p.sum()

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    p = self.probs(float(element.get("progress", 0.0)))
    b = int(rng.choice(len(self.branches), p=p))
    out = self.branches[b].random_map(element, rng)
    out["branch"] = np.int32(b)
    return out


def build_augment(cfg: Any, source: Any = None, *, max_strong: int | None = 1
                  ) -> grain.transforms.RandomMap:
  """Builds the augmentation declared by an augmentation config (see module docstring).

  Args:
    cfg: ``ConfigDict``/dict with ``mode`` and the fields of that mode.
    source: random-access source for Mosaic and MixUp.
    max_strong: in ``multi_branch`` mode, each branch may hold at most this many strong
      augmentations (the paper: one); None disables the check.

  Returns:
    A ``Chain`` or a ``RandomChoice``.
  """
  mode = cfg["mode"]
  if mode == "chain":
    return build_chain(cfg["chain"], source)
  if mode == "multi_branch":
    branches = tuple(build_chain(s, source) for s in cfg["branches"])
    if max_strong is not None:
      for s, b in zip(cfg["branches"], branches, strict=True):
        if b.num_strong > max_strong:
          raise ValueError(f"branch {s!r} has {b.num_strong} strong augmentations; the "
                           f"multi-branch paradigm allows at most {max_strong} per branch")
    start = tuple(float(x) for x in cfg["probs_start"])
    end = tuple(float(x) for x in cfg.get("probs_end", None) or start)
    return RandomChoice(branches, start, end)
  raise ValueError(f"augmentation mode must be 'chain' or 'multi_branch', got {mode!r}")


def branch_chains(aug: grain.transforms.RandomMap) -> Sequence[Chain]:
  """The branches of an augmentation (one for a plain chain)."""
  return aug.branches if isinstance(aug, RandomChoice) else (aug,)
