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

from benchmarks import compare, qm9


# ---------------------------------------------------------------- Delta_m%
def reference_delta_m(metrics, baseline, lower_better):
  """LibMTL's count_improvement: mean of (-1)^w (M_m - M_b) / M_b, in percent."""
  terms = [(-1.0) ** lower_better[t] * (metrics[t] - baseline[t]) / baseline[t]
           for t in baseline]
  return 100.0 * sum(terms) / len(terms)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), n=st.integers(1, 5))
def test_delta_m_matches_libmtl_definition(data, n):
  pos = st.floats(0.01, 100.0)
  tasks = [f"t{i}" for i in range(n)]
  base = {t: data.draw(pos) for t in tasks}
  metrics = {t: data.draw(pos) for t in tasks}
  lower = {t: int(data.draw(st.booleans())) for t in tasks}
  got = compare.delta_m(metrics, base, {t: not lower[t] for t in tasks})
  np.testing.assert_allclose(got, reference_delta_m(metrics, base, lower), rtol=1e-12,
                             atol=1e-12)
  assert compare.delta_m(base, base, {t: True for t in tasks}) == 0.0
  # Unit-free: rescaling one task's metric (e.g. Hartree -> eV) changes nothing.
  scaled = compare.delta_m({**metrics, "t0": 27.2 * metrics["t0"]},
                           {**base, "t0": 27.2 * base["t0"]}, {t: not lower[t] for t in tasks})
  np.testing.assert_allclose(scaled, got, rtol=1e-9, atol=1e-9)


def test_delta_m_signs():
  assert compare.delta_m({"a": 2.0}, {"a": 1.0}, {"a": True}) == 100.0  # accuracy doubled
  assert compare.delta_m({"a": 2.0}, {"a": 1.0}, {"a": False}) == -100.0  # error doubled


def test_interval():
  mean, half = compare._interval([1.0, 3.0])
  assert mean == 2.0
  np.testing.assert_allclose(half, 12.7062047, rtol=1e-6)  # t_{0.975, 1} * sd / sqrt(2)
  assert compare._interval([5.0]) == (5.0, 0.0)


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
  records = compare.read_results(out)
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
  np.testing.assert_allclose(rows["famo"]["delta_m"][0], np.mean(deltas), rtol=1e-9)
  table = compare.markdown({"toy": summary})
  assert "| famo | 2 |" in table and "### toy (5 steps)" in table


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
  compare.main(["report", "--results", out, "--plot", png, "--command", "test"])
  assert os.path.getsize(png) > 1000


def test_atomization_energies_of_methane():
  """QM9's first molecule (CH4): U0 -40.47893 Ha total, -0.631066 Ha atomization energy."""
  targets = np.zeros((1, len(qm9.TASKS)))
  targets[0, qm9.TASKS.index("U0")] = -40.47893
  targets[0, qm9.TASKS.index("mu")] = 1.5
  out = qm9.atomization(targets, np.array([[4.0, 1.0, 0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(out[0, qm9.TASKS.index("U0")], -0.631066, atol=1e-9)
  assert out[0, qm9.TASKS.index("mu")] == 1.5  # other targets untouched
  assert qm9.TASKS == ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
