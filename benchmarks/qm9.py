"""QM9 (11 regression targets) from the ``qm9pack`` wheel, as fixed Coulomb-matrix descriptors.

The data are read from the CSV files that ``pip install qm9pack`` puts in its package
folder (all 130,831 molecules; nothing is downloaded). Each molecule becomes a fixed
34-number descriptor computed once and cached:

- the 29 eigenvalues of its Coulomb matrix, sorted by decreasing magnitude and zero-padded
  (Rupp et al., PRL 2012: ``C_ii = 0.5 Z_i^2.4``, ``C_ij = Z_i Z_j / |R_i - R_j|``, R in bohr);
- its atom counts by element (H, C, N, O, F).

The targets are LibMTL's 11 QM9 tasks (PyG target indices 0, 1, 2, 3, 5, 6, 12-15, 11):
the standard 12 without the HOMO-LUMO gap, with U0, U, H and G as *atomization* energies
(the molecule's energy minus its atoms' reference energies, Ramakrishnan et al. 2014), in
the units qm9pack ships (atomic units for energies).
"""

from __future__ import annotations

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.problem import Problem

# LibMTL's QM9 task order (PyG targets 0-4 and 6-11), mapped to qm9pack's column names.
TARGETS = {
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}
TASKS = tuple(TARGETS)
_CHARGES = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
# B3LYP/6-31G(2df,p) energies (Hartree) of the free atoms H, C, N, O, F for U0, U, H, G: the
# QM9 "atomref" table, subtracted to give atomization energies.
_ATOM_REF = {
    "U0": (-0.500273, -37.846772, -54.583861, -75.064579, -99.718730),
    "U": (-0.498857, -37.845355, -54.582445, -75.063163, -99.717314),
    "H": (-0.497912, -37.844411, -54.581501, -75.062219, -99.716370),
    "G": (-0.510927, -37.861317, -54.598897, -75.079532, -99.733544),
}
_MAX_ATOMS = 29
_BOHR_PER_ANGSTROM = 1.0 / 0.52917721067
CACHE_VERSION = "qm9-cm-v1"


def cache_path() -> str:
  root = os.environ.get("TBGC_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "tbgc_jax")
  return os.path.join(root, f"{CACHE_VERSION}.npz")


def coulomb_spectrum(charges: np.ndarray, coords_bohr: np.ndarray) -> np.ndarray:
  """Sorted Coulomb-matrix eigenvalues of one molecule, zero-padded to 29.

  Args:
    charges: f64[n] nuclear charges.
    coords_bohr: f64[n, 3] positions in bohr.

  Returns:
    f64[29], by decreasing absolute value.
  """
  dist = np.linalg.norm(coords_bohr[:, None] - coords_bohr[None], axis=-1)
  np.fill_diagonal(dist, 1.0)
  cm = np.outer(charges, charges) / dist
  np.fill_diagonal(cm, 0.5 * charges ** 2.4)
  eig = np.linalg.eigvalsh(cm)
  eig = eig[np.argsort(-np.abs(eig))]
  return np.pad(eig, (0, _MAX_ATOMS - len(eig)))


def _build() -> dict[str, np.ndarray]:
  from importlib.resources import files

  import pandas as pd

  folder = files("qm9pack") / "data"
  cols = ["Elements", "XYZ_Ang", *TARGETS.values()]
  frames = [pd.read_csv(str(folder / f"qm9_part{i}.csv"), usecols=cols) for i in (1, 2, 3)]
  df = pd.concat(frames, ignore_index=True)
  feats = np.zeros((len(df), _MAX_ATOMS + len(_CHARGES)), np.float64)
  for i, (elements, xyz) in enumerate(zip(df["Elements"], df["XYZ_Ang"], strict=True)):
    names = ast.literal_eval(elements)
    z = np.array([_CHARGES[e] for e in names], np.float64)
    r = np.asarray(ast.literal_eval(xyz), np.float64) * _BOHR_PER_ANGSTROM
    feats[i, :_MAX_ATOMS] = coulomb_spectrum(z, r)
    feats[i, _MAX_ATOMS:] = [names.count(e) for e in _CHARGES]
  targets = np.stack([df[c].to_numpy(np.float64) for c in TARGETS.values()], axis=1)
  return {"features": feats.astype(np.float32), "targets": targets}


def atomization(targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Replaces the total energies U0, U, H, G in ``targets`` (``TASKS`` order) by atomization
  energies, given the atom counts f[N, 5] (H, C, N, O, F)."""
  out = np.array(targets, np.float64)
  for name, ref in _ATOM_REF.items():
    out[:, TASKS.index(name)] -= counts @ np.asarray(ref)
  return out


def load() -> dict[str, np.ndarray]:
  """All molecules: ``features`` f32[N, 34] and ``targets`` f64[N, 11] (``TASKS`` order).

  The first call parses the qm9pack CSVs (a minute or more on 2 cores) and caches features
  and raw targets in ``$TBGC_DATA_DIR`` (default ``~/.cache/tbgc_jax``).
  """
  path = cache_path()
  if os.path.isfile(path):
    with np.load(path) as f:
      data = {k: f[k] for k in f.files}
  else:
    data = _build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **data)
    os.replace(tmp, path)
  counts = data["features"][:, _MAX_ATOMS:].astype(np.float64)
  return {"features": data["features"], "targets": atomization(data["targets"], counts)}


def splits(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random disjoint index sets (LibMTL's protocol: one fixed random split of all molecules)."""
  data = load()
  perm = np.random.default_rng(seed).permutation(len(data["targets"]))
  ends = np.cumsum([n_train, n_val, n_test])
  if ends[-1] > len(perm):
    raise ValueError(f"split sizes sum to {ends[-1]} > {len(perm)} molecules")
  return {"train": perm[:ends[0]], "val": perm[ends[0]:ends[1]], "test": perm[ends[1]:ends[2]]}


def _dense_init(key, n_in, n_out):
  return {"w": jax.nn.initializers.lecun_normal()(key, (n_in, n_out)), "b": jnp.zeros(n_out)}


def _dense(p, x):
  return x @ p["w"] + p["b"]


def problem(n_train: int = 11_000, n_val: int = 1_000, n_test: int = 10_000,
            batch_size: int = 128, hidden: int = 128):
  """QM9 as a `benchmarks.compare.Problem`: an MLP on the fixed descriptors.

  Model: shared backbone ``34 -> hidden -> hidden`` (SiLU) and one linear head per target, as
  in LibMTL's QM9 setup (whose backbone is a message-passing net; see the module docstring
  of `benchmarks.compare` for why an MLP here). Loss: MSE on targets standardized
  with the training set's mean and std. Metric: test MAE in qm9pack's units (lower is better).
  The split is LibMTL's 110,000 / 10,000 / 10,000 scaled down to ``n_train`` / ``n_val``
  / ``n_test``; the test set is scored after the last step (no model selection on val).
  """
  data = load()
  idx = splits(n_train, n_val, n_test)
  x, y = data["features"].astype(np.float64), data["targets"]
  x_mu, x_sd = x[idx["train"]].mean(0), x[idx["train"]].std(0) + 1e-6
  y_mu, y_sd = y[idx["train"]].mean(0), y[idx["train"]].std(0)
  xs = ((x - x_mu) / x_sd).astype(np.float32)
  ys = ((y - y_mu) / y_sd).astype(np.float32)
  x_train, y_train = jnp.asarray(xs[idx["train"]]), jnp.asarray(ys[idx["train"]])
  x_test, y_test = jnp.asarray(xs[idx["test"]]), y[idx["test"]]

  def init(key):
    keys = jax.random.split(key, 2 + len(TASKS))
    return {"backbone": {"l0": _dense_init(keys[0], x.shape[1], hidden),
                         "l1": _dense_init(keys[1], hidden, hidden)},
            "heads": {t: _dense_init(keys[2 + k], hidden, 1) for k, t in enumerate(TASKS)}}

  def features(params, inputs):
    h = jax.nn.silu(_dense(params["backbone"]["l0"], inputs))
    return jax.nn.silu(_dense(params["backbone"]["l1"], h))

  def loss_fn(task):
    k = TASKS.index(task)

    def fn(params, batch):
      inputs, targets = batch
      pred = _dense(params["heads"][task], features(params, inputs))[:, 0]
      return jnp.mean(jnp.square(pred - targets[:, k]))

    return fn

  def sample(key, tasks):
    i = jax.random.randint(key, (batch_size,), 0, n_train)
    batch = (x_train[i], y_train[i])
    return {t: batch for t in tasks}

  @jax.jit
  def predict(params):
    h = features(params, x_test)
    return jnp.stack([_dense(params["heads"][t], h)[:, 0] for t in TASKS], axis=1)

  def evaluate(params):
    pred = np.asarray(predict(params), np.float64) * y_sd + y_mu
    mae = np.mean(np.abs(pred - y_test), axis=0)
    return {t: float(mae[k]) for k, t in enumerate(TASKS)}

  return Problem(
      name="qm9", tasks=TASKS, higher_better={t: False for t in TASKS}, init=init,
      loss_fns={t: loss_fn(t) for t in TASKS}, sample=sample, evaluate=evaluate,
      steps_per_epoch=max(1, n_train // batch_size),
      config={"n_train": n_train, "n_val": n_val, "n_test": n_test, "batch_size": batch_size,
              "hidden": hidden, "energies": "atomization"})
