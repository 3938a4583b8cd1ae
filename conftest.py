"""Test-session set-up for the whole repository (tests/ and the package's doctests).

This must run before any JAX backend is initialised, hence it lives in the root conftest,
which pytest loads before collecting anything:
- eight simulated CPU devices for the sharding tests;
- XLA:CPU's cheap back-end (no LLVM optimisation): the tests are compile-bound, and at these
  tiny shapes a test spends far more time in LLVM than in running code. Compiled buffer
  sizes (``memory_analysis``) do not depend on it. Subprocesses started by tests (train.py,
  eval.py) inherit it through the environment. Set ``TBGC_TEST_XLA_OPT=1`` to test with the
  default back-end;
- one persistent XLA compilation cache per test run, shared by the xdist workers and the
  processes tests start (train.py, eval.py, restarts after a kill): the end-to-end tests
  compile the same functions again and again. The controlling process makes the folder and
  the workers inherit it through the environment; a folder set by the caller
  (``JAX_COMPILATION_CACHE_DIR``) wins;
- the slow tests first: with ``-n 2`` each worker starts on a long end-to-end test and the
  short ones fill in after, instead of one worker finishing a two-minute test alone at the end.
"""

import os
import tempfile

import jax
import pytest

_FAST_BACKEND = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
if os.environ.get("TBGC_TEST_XLA_OPT", "0") != "1":
  flags = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(
      flags + [f for f in _FAST_BACKEND if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")])

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tbgc-test-jax-cache-")
# Cache every compile, however small or quick (the defaults skip those under 1 s).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory) -> str:
  """One embedded-data folder per test session (shared by xdist workers; generation is
  atomic and process-safe)."""
  from tbgc_jax.data import embedded

  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  return embedded.ensure_embedded(str(base / "tbgc_embedded"))


@pytest.fixture
def embedded_data(embedded_root, monkeypatch):
  """For documentation blocks (```python fixture:embedded_data): points the embedded data's
  cache folder ($TBGC_DATA_DIR) at the test session's copy, so blocks that read
  `configs.tiny()` share the one generated for the tests."""
  monkeypatch.setenv("TBGC_DATA_DIR", embedded_root)
  return embedded_root


def pytest_collection_modifyitems(items):
  """Slow tests first, otherwise collection order (stable; the same in every xdist worker)."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collect_file(file_path, parent):
  """Every ```python block of README.md and docs/*.md runs as a test (pytest-markdown-docs).

  The plugin's own switch (``--markdown-docs``) would also collect every ``.py`` file's
  docstrings again; here only the documentation pages are collected. The rules for the other
  blocks are in docs/contributing.md; tests/test_docs.py checks the shell blocks.
  """
  if file_path.suffix != ".md" or parent.config.option.markdowndocs:
    return None
  if not (file_path.name == "README.md" and file_path.parent == parent.config.rootpath
          or file_path.parent == parent.config.rootpath / "docs"):
    return None
  from pytest_markdown_docs.plugin import MarkdownTextFile

  return MarkdownTextFile.from_parent(parent, path=file_path)
