"""Merges by angles and norms: multi-SLERP, NuSLERP, the Karcher mean, model stock.

Each leaf kernel takes float32 leaves and follows mergekit's formula (its module is named
in each docstring), so a mergekit config gives mergekit's result; the tree-level methods
take recycle_jax's weights (alphas [N] on the simplex, or [G, N] per layer group) and
`kernels.map_merge` casts results to the stored dtype. Data-dependent branches of the
reference (colinear vectors, convergence) become `jnp.where` / a masked fixed-length loop,
so every kernel jits and vmaps.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from recycle_jax.merging import kernels

PyTree = Any


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(x * x))


def _safe_div(a, b):
  return a / jnp.where(b == 0, 1.0, b)


# ----------------------------------------------------------------------------- multi-SLERP

def multislerp_leaf(xs: Sequence[jax.Array], weights, base: jax.Array | None = None,
                    normalize_weights: bool = True, eps: float = 1e-8) -> jax.Array:
  """mergekit multislerp.py: barycentric interpolation on the hypersphere. Each (task)
  vector is projected to the unit sphere, the points are averaged in the tangent space at
  their normalized weighted mean, mapped back with the exponential map and scaled by the
  weighted mean of the norms. Vectors whose weighted mean vanishes fall back to the linear
  merge (mergekit does so for 2 vectors and raises for more).
  """
  w = jnp.asarray(weights, jnp.float32)
  if normalize_weights:
    w = w / jnp.sum(w)
  vs = [x if base is None else x - base for x in xs]
  norms = jnp.stack([_norm(v) for v in vs])
  units = [v / (norms[i] + eps) for i, v in enumerate(vs)]
  mean = sum(w[i] * u for i, u in enumerate(units))
  mean_norm = _norm(mean)
  mean = mean / jnp.where(mean_norm < eps, 1.0, mean_norm)
  tangent = sum(w[i] * (u - jnp.sum(u * mean) * mean) for i, u in enumerate(units))
  tn = _norm(tangent) + eps
  out = (mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)) * jnp.sum(norms * w)
  out = jnp.where(mean_norm < eps, sum(w[i] * v for i, v in enumerate(vs)), out)
  return out if base is None else out + base


def multislerp(alphas, pool) -> PyTree:
  """Multi-SLERP of the pool's checkpoints, tensor by tensor (base-free)."""
  return kernels.map_merge(lambda i, a, b, xs: multislerp_leaf(xs, a), alphas, pool)


# ----------------------------------------------------------------------------- NuSLERP

def nuslerp_t(w0, w1):
  """mergekit nuslerp.py: the interpolation factor of weights (w0, w1): w1 / (w0 + w1),
  0.5 when the sum vanishes."""
  s = w0 + w1
  return jnp.where(jnp.abs(s) < 1e-6, 0.5, w1 / jnp.where(jnp.abs(s) < 1e-6, 1.0, s))


def nuslerp_leaf(t, v0: jax.Array, v1: jax.Array, base: jax.Array | None = None,
                 row_wise: bool = False, flatten: bool = True, eps: float = 1e-8
                 ) -> jax.Array:
  """mergekit nuslerp.py: SLERP from v0 (t = 0) to v1 (t = 1), of the whole tensors
  (flatten), or of each vector along the last axis (the first with row_wise); of the task
  vectors when a base is given. Linear interpolation where sin^2 theta <= eps^2."""
  if base is not None:
    return base + nuslerp_leaf(t, v0 - base, v1 - base, None, row_wise, flatten, eps)
  shape = v0.shape
  if flatten:
    a, b = v0.reshape(-1), v1.reshape(-1)
  else:
    a, b = (jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)) if row_wise else (v0, v1)
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
  cos = jnp.clip(jnp.sum(unit(a) * unit(b), axis=-1, keepdims=True), -1.0, 1.0)
  colinear = 1 - cos * cos <= eps * eps
  theta = jnp.arccos(jnp.where(colinear, 0.0, cos))  # finite on the discarded branch
  sin = jnp.where(colinear, 1.0, jnp.sin(theta))
  res = (jnp.sin((1 - t) * theta) * a + jnp.sin(t * theta) * b) / sin
  res = jnp.where(colinear, (1 - t) * a + t * b, res)
  if not flatten and row_wise:
    res = jnp.swapaxes(res, 0, -1)
  return res.reshape(shape)


def nuslerp(alphas, pool) -> PyTree:
  """NuSLERP of 2 checkpoints (base-free), t = alphas[1] / (alphas[0] + alphas[1])."""
  return kernels.map_merge(
      lambda i, a, b, xs: nuslerp_leaf(nuslerp_t(a[0], a[1]), *xs), alphas, pool)


# ----------------------------------------------------------------------------- Karcher mean

def karcher_leaf(xs: Sequence[jax.Array], weights, max_iter: int = 10, tol: float = 1e-5
                 ) -> jax.Array:
  """mergekit karcher.py: the weighted Riemannian (Karcher) mean of the directions, by at
  most max_iter fixed-point steps (stopped once the tangent step's norm is under tol),
  scaled by the weighted sum of the norms. Tensors with norm <= tol take no part in the
  direction (mergekit passes uniform weights 1 / N)."""
  w = jnp.asarray(weights, jnp.float32)
  norms = jnp.stack([_norm(x) for x in xs])
  units = jnp.stack([_safe_div(x, norms[i]) for i, x in enumerate(xs)]).reshape(len(xs), -1)
  valid = norms > tol
  a = jnp.where(valid, w, 0.0)
  a = _safe_div(a, jnp.sum(a))
  u0 = jnp.einsum("n,nd->d", a, units)
  nu = _norm(u0)
  first = units[jnp.argmax(valid)]
  u0 = jnp.where(nu < tol, first, _safe_div(u0, nu))

  def step(_, carry):
    u, done = carry
    dots = jnp.clip(units @ u, -1.0, 1.0)
    theta = jnp.arccos(dots)
    coef = jnp.where(theta < tol, 0.0, a * _safe_div(theta, jnp.sin(theta)))
    t = jnp.einsum("n,nd->d", coef, units) - jnp.sum(coef * dots) * u
    nt = _norm(t)
    stop = done | (nt < tol)
    new = jnp.cos(nt) * u + jnp.sin(nt) * _safe_div(t, nt)
    nn = _norm(new)
    new = jnp.where(nn > tol, _safe_div(new, nn), new)
    return jnp.where(stop, u, new), stop

  u, _ = jax.lax.fori_loop(0, max_iter, step, (u0, jnp.asarray(False)))
  u = jnp.where(jnp.any(valid), u, 0.0)
  return (jnp.sum(w * norms) * u).reshape(xs[0].shape)


def karcher(alphas, pool, max_iter: int = 10, tol: float = 1e-5) -> PyTree:
  """The Karcher mean of the pool's checkpoints, tensor by tensor (base-free)."""
  return kernels.map_merge(lambda i, a, b, xs: karcher_leaf(xs, a, max_iter, tol), alphas,
                            pool)


# ----------------------------------------------------------------------------- model stock

def model_stock_leaf(base: jax.Array, xs: Sequence[jax.Array], weights=None,
                     filter_wise: bool = False) -> jax.Array:
  """mergekit model_stock.py (Jang et al.): the average of the fine-tuned checkpoints pulled
  toward the base by t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of their
  task vectors, over the whole tensor or (filter_wise) per row, a vector being one row;
  the base where 1 + (N - 1) cos vanishes.
  weights [N] replace the uniform average (mergekit: uniform)."""
  n = len(xs)
  w = jnp.full((n,), 1.0 / n) if weights is None else jnp.asarray(weights, jnp.float32)
  shape = base.shape
  rows = lambda v: v.reshape(-1, shape[-1]) if filter_wise and v.ndim > 1 else v.reshape(1, -1)
  b, vs = rows(base), [rows(x) for x in xs]
  offsets = [v - b for v in vs]
  rownorm = lambda v: jnp.linalg.norm(v, axis=-1)
  cos = [jnp.clip(jnp.sum(offsets[i] * offsets[j], -1) /
                  jnp.maximum(rownorm(offsets[i]) * rownorm(offsets[j]), 1e-6), -1.0, 1.0)
         for i in range(n) for j in range(i + 1, n)]
  c = jnp.mean(jnp.stack(cos), axis=0)[:, None]
  den = 1 + (n - 1) * c
  t = jnp.where(jnp.abs(den) < 1e-6, 0.0, n * c / jnp.where(jnp.abs(den) < 1e-6, 1.0, den))
  avg = sum(w[i] * v for i, v in enumerate(vs))
  return (t * avg + (1 - t) * b).reshape(shape)


def model_stock(alphas, pool, base) -> PyTree:
  """Model stock of the pool against its base, tensor by tensor; alphas weight the average
  (uniform alphas: mergekit's)."""
  return kernels.map_merge(lambda i, a, b, xs: model_stock_leaf(b, xs, a), alphas, pool,
                            base)
