"""The comparison harness: Delta_m%, intervals, descriptors, resumable runs, CLI smoke test."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from benchmarks import compare, grid, qm9


def reference_delta_m(metrics, baseline, lower_better):
  """LibMTL's count_improvement: mean of (-1)^w (M_m - M_b) / M_b, in percent."""
  terms = [(-1.0) ** lower_better[t] * (metrics[t] - baseline[t]) / baseline[t]
           for t in baseline]
  return 100.0 * sum(terms) / len(terms)


# ---------------------------------------------------------------- Coulomb matrix
def test_coulomb_spectrum_h2():
  d = 1.4
  eig = qm9.coulomb_spectrum(np.array([1.0, 1.0]), np.array([[0, 0, 0], [d, 0, 0.0]]))
  np.testing.assert_allclose(eig[:2], [0.5 + 1 / d, 0.5 - 1 / d])
  assert eig.shape == (29,) and not eig[2:].any()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 9))
def test_coulomb_spectrum_invariances(seed, n):
  """Invariant to atom order, rotation and translation (why it is a molecular descriptor)."""
  rng = np.random.default_rng(seed)
  z = rng.choice([1.0, 6.0, 7.0, 8.0, 9.0], n)
  r = rng.normal(size=(n, 3)) * 2.0
  ref = qm9.coulomb_spectrum(z, r)
  perm = rng.permutation(n)
  rot = Rotation.random(random_state=seed).as_matrix()
  moved = r[perm] @ rot.T + rng.normal(size=3)
  np.testing.assert_allclose(qm9.coulomb_spectrum(z[perm], moved), ref, rtol=1e-9, atol=1e-9)
  assert np.all(np.diff(np.abs(ref[:n])) <= 1e-12)


# ---------------------------------------------------------------- harness on a toy problem
def toy_problem():
  """Two linear-regression tasks on shared features: enough to exercise the harness."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  w = {"a": rng.normal(size=4), "b": rng.normal(size=4)}
  y = {t: x @ jnp.asarray(v, jnp.float32) for t, v in w.items()}

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"backbone": {"w": jax.random.normal(k1, (4, 4)) * 0.5},
            "heads": {"a": jax.random.normal(k2, (4,)), "b": jax.random.normal(k3, (4,))}}

  def loss_fn(t):
    def fn(p, batch):
      return jnp.mean((batch[0] @ p["backbone"]["w"] @ p["heads"][t] - batch[1]) ** 2)
    return fn

  def sample(key, tasks):
    i = jax.random.randint(key, (8,), 0, 64)
    return {t: (x[i], y[t][i]) for t in tasks}

  def evaluate(p):
    return {t: float(jnp.mean(jnp.abs(x @ p["backbone"]["w"] @ p["heads"][t] - y[t])))
            for t in ("a", "b")}

  return compare.Problem(
      name="toy", tasks=("a", "b"), higher_better={"a": False, "b": False}, init=init,
      loss_fns={"a": loss_fn("a"), "b": loss_fn("b")}, sample=sample, evaluate=evaluate,
      steps_per_epoch=8, config={"n": 64})


def test_run_grid_resumes_and_summarizes(tmp_path):
  out = str(tmp_path / "r.jsonl")
  problem = toy_problem()
  methods = ["tbgc", "famo", "rlw", "single"]
  first = compare.run_grid(out, [problem], methods, [0, 1], steps=5, log=lambda *a, **k: None)
  assert len(first) == 2 * (3 + 2)  # 3 methods + 2 single-task runs, 2 seeds
  assert compare.run_grid(out, [problem], methods, [0, 1], steps=5,
                          log=lambda *a, **k: None) == []  # everything done: skipped
  more = compare.run_grid(out, [problem], ["tbgc"], [2], steps=5, log=lambda *a, **k: None)
  assert len(more) == 1
  records = grid.read_results(out)
  assert len(records) == 11
  # A seed reruns identically (seeded parameters, batches and method state).
  again = compare.train(problem, "rlw", 1, 5)
  old = next(r for r in records if r["method"] == "rlw" and r["seed"] == 1)
  assert again["metrics"] == old["metrics"]

  summary = compare.summarize(records, {"toy": problem.higher_better})["toy"]
  rows = summary["rows"]
  assert rows["tbgc"]["seeds"] == 3 and rows["famo"]["seeds"] == 2
  base = {t: np.mean([r["metrics"][t] for r in records
                      if r["method"] == "single" and r["task"] == t]) for t in ("a", "b")}
  deltas = [reference_delta_m(r["metrics"], base, {"a": 1, "b": 1})
            for r in records if r["method"] == "famo"]
  np.testing.assert_allclose(rows["famo"]["delta_m"].mean, np.mean(deltas), rtol=1e-9)
  assert rows["famo"]["rank"] is not None and not np.isnan(rows["famo"]["p_holm"])
  assert set(summary["vs_plain"]) == set() and set(summary["pairs"]) == set()  # no `none` run
  table = compare.markdown({"toy": summary})
  assert "| famo | 2 |" in table and "### toy (5 steps)" in table
  assert "Holm-corrected over the 3 methods" in table


@pytest.mark.slow
def test_cli_smoke_embedded3(tmp_path, embedded_root, monkeypatch):
  """The command itself: 2 steps of one method and the baselines, then the report and plot."""
  monkeypatch.setenv("TBGC_DATA_DIR", embedded_root)
  out, png = str(tmp_path / "r.jsonl"), str(tmp_path / "fig.png")
  compare.main(["run", "--out", out, "--benchmarks", "embedded3", "--methods", "tbgc,single",
                "--seeds", "0", "--steps", "2"])
  with open(out) as f:
    records = [json.loads(line) for line in f]
  assert [r["method"] for r in records] == ["tbgc", "single", "single", "single"]
  assert all(0.0 <= v <= 1.0 for r in records for v in r["metrics"].values())
  compare.main(["report", "--results", out, "--plot", png])
  assert os.path.getsize(png) > 1000
  stamp = (tmp_path / "fig.txt").read_text()
  assert "python -m benchmarks.compare report --results" in stamp and "jax 0." in stamp
  assert "seeds embedded3 1 per method" in stamp and "embedded3 2 steps" in stamp


def test_atomization_energies_of_methane():
  """QM9's first molecule (CH4): U0 -40.47893 Ha total, -0.631066 Ha atomization energy."""
  targets = np.zeros((1, len(qm9.TASKS)))
  targets[0, qm9.TASKS.index("U0")] = -40.47893
  targets[0, qm9.TASKS.index("mu")] = 1.5
  out = qm9.atomization(targets, np.array([[4.0, 1.0, 0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(out[0, qm9.TASKS.index("U0")], -0.631066, atol=1e-9)
  assert out[0, qm9.TASKS.index("mu")] == 1.5  # other targets untouched
  assert qm9.TASKS == ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
