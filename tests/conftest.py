"""Shared test fixtures (the device set-up and `embedded_root` are in the repository's root
conftest.py)."""

import os

import pytest


@pytest.fixture(scope="session")
def cache_dir() -> str:
  """The test run's persistent compilation cache (set up in the root conftest.py)."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]
