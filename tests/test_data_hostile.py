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
