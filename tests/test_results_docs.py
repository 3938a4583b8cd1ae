"""Every generated table and figure stamp in README.md and docs/ recomputes from the committed
results files through `benchmarks.stats` (`compare report --docs`, `reproduce --docs`)."""

import os
import re

import pytest

from benchmarks import compare, grid, reproduce

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCS = ["README.md", *(os.path.join("docs", f) for f in
                        sorted(os.listdir(os.path.join(_ROOT, "docs"))) if f.endswith(".md"))]
_ABLATIONS = {"ablation": "docs/results/ablation",
              "ablation-cw1": "docs/results/ablation_classweight1"}


def _text(path):
  with open(os.path.join(_ROOT, path)) as f:
    return f.read()


def _blocks_in_docs():
  """{block name: [(doc, body)]} of every generated block in the docs."""
  found = {}
  for doc in _DOCS:
    text = _text(doc)
    for name in re.findall(r"<!-- begin: (.+?) -->", text):
      found.setdefault(name, []).append((doc, grid.read_block(text, name)))
  return found


@pytest.fixture(scope="module")
def expected():
  """Every block, recomputed from the results files and the figure stamps."""
  records = grid.read_results(os.path.join(_ROOT, "docs/results/compare.jsonl"))
  blocks = compare.doc_blocks(records, compare.summarize(records, compare._higher_better()))
  for prefix, folder in _ABLATIONS.items():
    rows = grid.read_results(os.path.join(_ROOT, folder, "results.jsonl"))
    norms = grid.read_results(os.path.join(_ROOT, folder, "grad_norms.jsonl"))
    blocks.update(reproduce.report_blocks(reproduce.in_percent(rows), reproduce.PAPER_METHODS,
                                          prefix, norms))
  blocks.update(grid.stamp_blocks(os.path.join(_ROOT, "docs")))
  return blocks


def test_every_generated_block_recomputes_from_the_results(expected):
  found = _blocks_in_docs()
  assert {"compare qm9", "compare embedded3", "compare readme", "ablation table2",
          "ablation table3", "ablation readme", "stamp figures/comparison"} <= set(found)
  for name, places in found.items():
    assert name in expected, f"{places[0][0]}: no generator for block {name!r}"
    for doc, body in places:
      assert body == expected[name], f"{doc}: block {name!r} differs from the results"


def test_every_figure_the_docs_show_carries_its_stamp():
  found = _blocks_in_docs()
  for doc in _DOCS:
    for fig in re.findall(r"!\[[^\]]*\]\((?:docs/)?([\w./-]+)\.png\)", _text(doc)):
      stamp = os.path.join(_ROOT, "docs", f"{fig}.txt")
      assert os.path.exists(stamp), f"{doc}: {fig}.png has no stamp {stamp}"
      assert any(d == doc for d, _ in found.get(f"stamp {fig}", [])), (
          f"{doc} shows {fig}.png without its stamp block")
      text = _text(stamp)
      assert "jax " in text and "Command: python" in text and "seed" in text


def test_update_blocks_rewrites_only_marked_blocks(tmp_path):
  doc = tmp_path / "page.md"
  doc.write_text("intro\n<!-- begin: t -->\nold\n<!-- end: t -->\nafter\n")
  assert grid.update_blocks(str(doc), {"t": "| a |\n", "missing": "x"}) == ["t"]
  text = doc.read_text()
  assert text == "intro\n<!-- begin: t -->\n| a |\n<!-- end: t -->\nafter\n"
  assert grid.read_block(text, "t") == "| a |\n" and grid.read_block(text, "missing") is None
