"""Checks a built wheel of tbgc-jax: metadata, then a clean install without the trainer extra.

  python .ci/check_wheel.py dist/tbgc_jax-*.whl

1. The wheel's unconditional requirements are exactly jax, optax and numpy.
2. A fresh virtual environment (no pip, no site packages) gets the wheel and, linked from the
   running environment, only the installed distributions those three need (their
   requirement closure, without extras): the same packages a registry install would bring,
   without downloading or unpacking jaxlib again. Outside the checkout, `import tbgc_jax`
   must work, one TBGC step must give the documented result, and the trainer's packages
   (flax, grain, ...) must not be importable there.
"""

import importlib.metadata as md
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CORE = {"jax", "optax", "numpy"}
TRAINER_ONLY = ("flax", "grain", "orbax", "tensorflow_datasets", "ml_collections", "cv2")
SMOKE = """
import sys
import jax.numpy as jnp, optax, tbgc_jax
assert "/site-packages/tbgc_jax/" in tbgc_jax.__file__.replace("\\\\", "/"), tbgc_jax.__file__
params = {"backbone": jnp.ones(3), "head": jnp.ones(2)}
tx = optax.chain(tbgc_jax.tbgc(0.1, {"backbone": True, "head": False}, tasks=("a", "b")),
                 optax.sgd(1.0))
grads = {"a": {"backbone": jnp.full(3, 5.0), "head": jnp.ones(2)},
         "b": {"backbone": jnp.full(3, 1e-3), "head": jnp.zeros(2)}}
_, state = tx.update(grads, tx.init(params), params)
after = {t: round(float(d["backbone_norm_after"]), 6)
         for t, d in tbgc_jax.task_diagnostics(state).items()}
assert after == {"a": 0.1, "b": 0.1}, after
for name in TRAINER_ONLY:
  try:
    __import__(name)
  except ImportError:
    continue
  raise SystemExit(f"{name} is importable in the clean environment")
print("wheel OK:", tbgc_jax.__version__, len(tbgc_jax.method_names()), "methods")
"""


def wheel_requirements(wheel: Path) -> list[Requirement]:
  with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
  return [Requirement(line.split(":", 1)[1].strip()) for line in lines
          if line.startswith("Requires-Dist:")]


def closure(names: set[str]) -> set[str]:
  """Installed distributions needed by `names`, following requirements without extras."""
  seen, todo = set(), [canonicalize_name(n) for n in names]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for text in md.requires(name) or ():
      req = Requirement(text)
      if req.marker is None or req.marker.evaluate({"extra": ""}):
        todo.append(canonicalize_name(req.name))
  return seen


def link_distributions(names: set[str], into: Path) -> None:
  """Symlinks every top-level file or folder of the distributions into one folder."""
  for name in names:
    dist = md.distribution(name)
    tops = {Path(str(f)).parts[0] for f in dist.files or ()}
    for top in tops:
      src = Path(dist.locate_file(top))
      if top in ("..", "bin") or top.endswith(".pth") or not src.exists():
        continue
      dst = into / top
      if not dst.exists():
        dst.symlink_to(src)


def main(wheel: str) -> None:
  wheel_path = Path(wheel)
  reqs = wheel_requirements(wheel_path)
  core = {canonicalize_name(r.name) for r in reqs
          if r.marker is None or r.marker.evaluate({"extra": ""})}
  if core != CORE:
    raise SystemExit(f"{wheel}: unconditional requirements {sorted(core)}, expected "
                     f"{sorted(CORE)}")
  with tempfile.TemporaryDirectory(prefix="tbgc-wheel-") as tmp:
    env_dir, deps = Path(tmp) / "env", Path(tmp) / "deps"
    deps.mkdir()
    link_distributions(closure(CORE), deps)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel_path.resolve())], check=True)
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    (site / "core_deps.pth").write_text(f"{deps}\n")
    env = {"PATH": os.environ.get("PATH", ""), "JAX_PLATFORMS": "cpu"}
    subprocess.run([python, "-c", f"TRAINER_ONLY = {TRAINER_ONLY!r}\n" + SMOKE], check=True,
                   cwd=tmp, env=env)


if __name__ == "__main__":
  main(*sys.argv[1:])
