"""Shared test fixtures (the device set-up is in the repository's root conftest.py)."""

import os

import pytest


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory) -> str:
  """One embedded-data folder per test session (shared by xdist workers; generation is
  atomic and process-safe)."""
  from tbgc_jax.data import embedded

  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  return embedded.ensure_embedded(str(base / "tbgc_embedded"))


@pytest.fixture(scope="session")
def cache_dir() -> str:
  """The test run's persistent compilation cache (set up in the root conftest.py)."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]
