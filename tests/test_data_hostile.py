"""The readers against a corpus of malformed datasets (``tests/hostile_data.py``).

For every case: under ``strict`` the error names the file, the record, the field, what was
expected and what was found; under ``skip`` exactly the good records are kept and exactly
the bad ones counted and logged. File-level cases raise under both policies; accepted
inputs read the same under both.
"""

import logging

import pytest
from hostile_data import CASES, record_key

from tbgc_jax.data.records import DataValidationError


def test_corpus_size():
  assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


def _keys(result):
  records = result.records if hasattr(result, "records") else result
  return tuple(record_key(r) for r in records)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile(case, tmp_path, caplog):
  root = tmp_path / "data"
  root.mkdir()
  read = case.build(root)
  if case.error is None:  # accepted (a documented normalisation)
    for policy in ("strict", "skip"):
      result = read(policy)
      assert _keys(result) == case.kept and result.num_skipped == 0 and not result.skipped
    return
  err = case.error
  with pytest.raises(DataValidationError) as e:
    read("strict")
  msg = str(e.value)
  head = f"{root / err.file}: {err.record}: "
  assert msg.startswith(head), (msg, head)
  rest = msg[len(head):]
  if err.field is not None:
    assert rest.startswith(f"field {err.field!r}: "), rest
  expected, sep, got = rest.partition(", got ")
  assert sep and err.expected in expected, (err.expected, msg)
  assert err.got in got, (err.got, msg)
  if case.file_level:  # the file itself is unusable: a clear error under skip too
    with pytest.raises(DataValidationError) as e2:
      read("skip")
    assert str(e2.value) == msg
    return
  with caplog.at_level(logging.WARNING):
    result = read("skip")
  assert _keys(result) == case.kept
  assert result.num_skipped == case.skipped == len(result.skipped)
  assert msg in result.skipped  # the strict error is one of the logged skips
  assert f"skipped {case.skipped} record(s), kept {len(case.kept)}" in caplog.text
  assert msg in caplog.text


_GARBAGE = [None, True, 0, -1, 1.5, float("nan"), float("inf"), 2**70, "", "x", "10",
            "../x.jpg", "/etc/passwd", [], [1], [1, 2, 3, 4], [[1]], {}, {"a": 1}, "\x00"]


def _json_paths(o, prefix=()):
  if prefix:
    yield prefix
  items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
  for k, v in items:
    yield from _json_paths(v, (*prefix, k))


@pytest.mark.parametrize("fmt", ["coco", "tt100k"])
def test_random_garbage_in_fields(fmt, tmp_path):
  """Seeded fuzz: any value anywhere in the JSON gives DataValidationError under strict and
  never an exception under skip (unless the file's top level itself is broken)."""
  import copy
  import random

  from hostile_data import coco, tt100k

  rng = random.Random(0)
  for trial in range(40):
    def mutate(data, root):
      paths = list(_json_paths(data))
      for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        target = data
        try:
          for k in path[:-1]:
            target = target[k]
          target[path[-1]] = copy.deepcopy(rng.choice(_GARBAGE))
        except (KeyError, IndexError, TypeError):  # an earlier change removed the path
          pass

    root = tmp_path / str(trial)
    root.mkdir()
    read = (coco if fmt == "coco" else tt100k)(mutate)(root)
    try:
      read("strict")
    except DataValidationError:
      pass
    try:
      result = read("skip")
    except DataValidationError as e:
      assert ": top level: " in str(e), str(e)
      continue
    assert result.num_skipped == len(result.skipped)
