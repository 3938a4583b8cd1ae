"""Packaging: the transforms install and import without the trainer's stack."""

import subprocess
import sys
import tomllib
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_TRAINER_ONLY = ("cv2", "grain", "orbax", "tensorflow_datasets", "pycocotools", "matplotlib",
                 "flax", "ml_collections", "tensorboardX", "PIL", "skimage", "sklearn")


def test_import_does_not_load_the_trainer_stack():
  code = ("import sys, tbgc_jax; "
          f"print(','.join(m for m in {_TRAINER_ONLY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  assert out.stdout.strip() == "", f"`import tbgc_jax` loaded {out.stdout.strip()}"


def test_core_dependencies_are_jax_optax_numpy():
  project = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]
  names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
  assert names == {"jax", "optax", "numpy"}
  assert "tbgc-jax[trainer]" in project["optional-dependencies"]["test"]
