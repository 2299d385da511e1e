"""Scalarizations, Pareto fronts, hypervolume and sweep configs (pure numpy/jax)."""
import numpy as np
import pytest

from recycle_jax.search import pareto, loop


def test_scalarize_matches_its_definition():
  s = np.array([[60.0, 80.0], [90.0, 10.0]], np.float32)
  np.testing.assert_allclose(pareto.scalarize(s), [70, 50])
  np.testing.assert_allclose(pareto.scalarize(s, [3, 1]), [65, 70])
  cheb = pareto.scalarize(s, [0.5, 0.5], 1.0)
  np.testing.assert_allclose(cheb, [-0.5 * 40 + 0.01 * 70, -0.5 * 90 + 0.01 * 50], rtol=1e-6)
  assert np.isnan(pareto.scalarize(np.array([np.nan, 1.0])))
  with pytest.raises(Exception, match="needs weights"):
    pareto.scalarization_args("weighted", None)
  with pytest.raises(Exception, match="3 task weights for 2 tasks"):
    pareto.scalarization_args("weighted", [1, 1, 1], 2)


def test_pareto_front_and_hypervolume():
  pts = np.array([[10, 90], [50, 50], [40, 40], [90, 10], [50, 50], [np.nan, 99], [20, 20]])
  mask = pareto.pareto_mask(pts)
  assert mask.tolist() == [True, True, False, True, True, False, False]
  assert pareto.front_indices(pts).tolist() == [0, 1, 3]
  # Union of three boxes from the origin: 10*90 + (50-10)*50 + (90-50)*10 = 3300.
  assert pareto.hypervolume(pts, 0.0, normalize=False) == pytest.approx(3300)
  assert pareto.hypervolume(pts) == pytest.approx(0.33)
  # Against (20, 20) only (50, 50) lies above the reference in every task.
  assert pareto.hypervolume(pts, [20, 20], normalize=False) == pytest.approx(30 * 30)
  # Three tasks against a Monte Carlo estimate.
  rng = np.random.default_rng(0)
  p3 = rng.uniform(0, 100, size=(12, 3))
  u = rng.uniform(0, 100, size=(200_000, 3))
  mc = np.mean(np.any(np.all(u[:, None] <= p3[None], -1), -1))
  assert pareto.hypervolume(p3) == pytest.approx(mc, abs=0.01)
  assert pareto.hypervolume(np.array([[0.0, 50.0]])) == 0.0


def test_tradeoff_weights_and_sweep_configs():
  w2 = pareto.tradeoff_weights(2, 3)
  np.testing.assert_allclose(w2, [[0, 1], [0.5, 0.5], [1, 0]])
  w3 = pareto.tradeoff_weights(3, 6)
  assert w3.shape == (6, 3) and np.allclose(w3.sum(-1), 1) and np.allclose(w3[:3], np.eye(3))
  cfgs = pareto.sweep_configs(loop.SearchConfig(budget=20),
                              pareto.SweepConfig(num_weights=3, budget=10), 2)
  assert [(c.scalarization, c.task_weights, c.budget) for c in cfgs][:2] == [
      ("weighted", (0.0, 1.0), 10), ("weighted", (0.5, 0.5), 10)]
  assert len(cfgs) == 6 and cfgs[-1].scalarization == "chebyshev"
  assert pareto.tradeoff_weights(2, 0).shape == (0, 2)
