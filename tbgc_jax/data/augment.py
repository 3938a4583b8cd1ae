"""Augmentation chains, the paper's multi-branch ``RandomChoice``, and the three modes.

Chains are declared in configs as big_vision-style strings, transforms separated by ``|``
with keyword arguments as Python literals, e.g.
``"multiscale(long_edge=608, short_min=480, short_max=608)|hflip|autoaugment|noise"``
(names: ``tbgc_jax.data.transforms.REGISTRY``).

An augmentation config (``ConfigDict`` or dict) has ``mode``, one of ``AUGMENT_MODES``:
- ``"plain"``: the chain ``plain`` (the paper's section 3 setting, used for Table 2);
- ``"multi_branch"``: one of ``branches`` (chain strings; default ``(plain,)``) per example,
  chosen by ``RandomChoice`` (Table 1, section 2.3): uniformly, or with ``probs``; with
  ``curriculum=True`` the probabilities move linearly from ``probs_start`` to ``probs_end``
  over training (off by default: the paper gives no schedule);
- ``"parallel"``: the chain ``parallel`` (default: the one branch), which must hold exactly
  the union of the branches' transforms (Table 3's baseline).
A single branch builds a plain ``Chain`` (classification: no multi-branch in the paper).

``fields`` (the task's fields and their kinds, ``tbgc_jax.data.fields``) is given to every
transform of the chain, which moves each field by its kind.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from tbgc_jax.data.fields import as_fields
from tbgc_jax.data.transforms import REGISTRY, Transform
from tbgc_jax.presets import config_value

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


def build_chain(spec: str, source: Any = None, fields: Any = ()) -> Chain:
  """Builds a ``Chain`` from a spec string.

  Args:
    spec: ``"name(key=value, ...)|name|..."``.
    source: random-access source given to Mosaic/MixUp.
    fields: the example's fields and their kinds (a mapping or ``(key, kind)`` pairs).
  """
  fields = as_fields(fields)
  ts = []
  for name, kwargs in parse_spec(spec):
    cls = REGISTRY[name]
    names = {f.name for f in dataclasses.fields(cls)}
    accepted = names - {"source", "fields"}
    unknown = set(kwargs) - accepted
    if unknown:
      raise ValueError(f"augmentation {name!r}: unknown argument(s) {sorted(unknown)}; "
                       f"accepted: {sorted(accepted)}")
    for k, v in kwargs.items():
      if isinstance(v, list):
        kwargs[k] = tuple(v)
    if "source" in names:
      kwargs["source"] = source
    ts.append(cls(**kwargs, fields=fields))
  return Chain(tuple(ts))


def check_probs(name: str, probs: Sequence[float], n: int) -> tuple[float, ...]:
  """Returns ``probs`` as floats if they are ``n`` non-negative numbers summing to 1."""
  p = np.asarray(probs, np.float64)
  if p.shape != (n,) or (p < 0).any() or not np.isclose(p.sum(), 1.0):
    raise ValueError(f"{name}: expected {n} non-negative probabilities summing to 1, got "
                     f"{tuple(probs)}")
  return tuple(float(x) for x in p)


@dataclasses.dataclass(frozen=True)
class RandomChoice(grain.transforms.RandomMap):
  """Multi-branch augmentation: one branch per example, chosen at random.

  Branch probabilities are ``probs_start`` (empty: uniform) at training progress 0 and
  ``probs_end`` (empty: same as the start, no curriculum) at progress 1, linearly in between,
  p(t) = (1 - t) p_start + t p_end. The example's ``progress`` entry (default 0) gives t; the
  chosen branch index is written to ``branch``.
  """

  branches: tuple[Chain, ...] = ()
  probs_start: tuple[float, ...] = ()
  probs_end: tuple[float, ...] = ()

  def __post_init__(self):
    n = len(self.branches)
    if not n:
      raise ValueError("RandomChoice needs at least one branch")
    start = self.probs_start or (1.0 / n,) * n
    start = check_probs("RandomChoice.probs_start", start, n)
    end = check_probs("RandomChoice.probs_end", self.probs_end or start, n)
    object.__setattr__(self, "probs_start", start)
    object.__setattr__(self, "probs_end", end)

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


AUGMENT_MODES = ("plain", "parallel", "multi_branch")


def _branch_specs(cfg: Any) -> tuple[str, ...]:
  specs = tuple(config_value(cfg, "branches", ()))
  return specs or (cfg["plain"],)


def build_parallel(cfg: Any, source: Any = None, fields: Any = ()) -> Chain:
  """Builds the "parallel" chain of an augmentation config (Table 3's baseline).

  Raises:
    ValueError: unless it holds exactly the union of the branches' transforms, each once.
  """
  specs = _branch_specs(cfg)
  spec = config_value(cfg, "parallel", None)
  if spec is None:
    if len(specs) > 1:
      raise ValueError("augmentation mode 'parallel' needs a 'parallel' chain when there is "
                       f"more than one branch; branches: {specs}")
    spec = specs[0]
  chain = build_chain(spec, source, fields)
  union = {t for s in specs for t in build_chain(s, source, fields).transforms}
  if len(set(chain.transforms)) != len(chain.transforms) or set(chain.transforms) != union:
    extra = sorted(type(t).__name__ for t in set(chain.transforms) - union)
    missing = sorted(type(t).__name__ for t in union - set(chain.transforms))
    raise ValueError(f"parallel chain {spec!r} must hold each transform of the branches "
                     f"{specs} exactly once and nothing else; extra: {extra}, missing: "
                     f"{missing}")
  return chain


def build_augment(cfg: Any, source: Any = None, *, max_strong: int | None = 1,
                  fields: Any = ()) -> grain.transforms.RandomMap:
  """Builds the augmentation declared by an augmentation config (see module docstring).

  Args:
    cfg: ``ConfigDict``/dict with ``mode`` and the fields of that mode.
    source: random-access source for Mosaic and MixUp.
    max_strong: in ``multi_branch`` mode, each branch may hold at most this many strong
      augmentations (the paper: one); None disables the check.
    fields: the example's fields and their kinds (``tbgc_jax.data.fields``).

  Returns:
    A ``Chain`` or (several branches) a ``RandomChoice``.
  """
  mode = cfg["mode"]
  if mode == "plain":
    return build_chain(cfg["plain"], source, fields)
  if mode == "parallel":
    return build_parallel(cfg, source, fields)
  if mode != "multi_branch":
    raise ValueError(f"augmentation mode must be one of {AUGMENT_MODES}, got {mode!r}")
  specs = _branch_specs(cfg)
  branches = tuple(build_chain(s, source, fields) for s in specs)
  if max_strong is not None:
    for s, b in zip(specs, branches, strict=True):
      if b.num_strong > max_strong:
        raise ValueError(f"branch {s!r} has {b.num_strong} strong augmentations; the "
                         f"multi-branch paradigm allows at most {max_strong} per branch")
  n = len(branches)
  # Validate every probability field given, used or not: a typo fails at start.
  given = {k: check_probs(k, config_value(cfg, k), n) for k in ("probs", "probs_start", "probs_end")
           if config_value(cfg, k, ())}
  if n == 1:
    return branches[0]
  if config_value(cfg, "curriculum", False):
    if "probs_start" not in given or "probs_end" not in given:
      raise ValueError("curriculum=True needs probs_start and probs_end")
    return RandomChoice(branches, given["probs_start"], given["probs_end"])
  probs = given.get("probs", ())
  return RandomChoice(branches, probs, probs)


def branch_chains(aug: grain.transforms.RandomMap) -> Sequence[Chain]:
  """The branches of an augmentation (one for a plain chain)."""
  return aug.branches if isinstance(aug, RandomChoice) else (aug,)
