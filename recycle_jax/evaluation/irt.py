"""Item response theory for cheap fitness: a 2PL model per task, an informative subset of
its items, and each candidate's full-split score estimated from its answers on that subset.

  P(model i answers item j) = sigmoid(a_j (theta_i - b_j)),  a_j > 0 discrimination,
                                                             b_j difficulty, theta_i ability.

`fit` takes the per-item correctness of the calibration models (responses [M, E]: the
single checkpoints, the seeds, and full-fidelity candidates as the search scores them) and
fits (a, b, theta) by maximum a posteriori (theta ~ N(0, 1), log a ~ N(0, 1),
b ~ N(0, 3^2)), full-batch Adam in one compiled loop. `choose` takes the k items of most
Fisher information I_j(theta) = a_j^2 p_j (1 - p_j), summed over the calibration models'
abilities (where the candidates of a search live). `estimate` is tinyBenchmarks' gp-IRT
(Polo et al. 2024, tinyBenchmarks/__init__.py): the candidate's ability from its subset
answers (MAP, Newton steps), then

  p-IRT  = (sum of its subset answers + sum over the other items of p_j(theta)) / E
  gp-IRT = lam * (subset mean) + (1 - lam) * p-IRT

with lam = MSE(p-IRT) / (MSE(p-IRT) + MSE(subset mean)), both errors measured on the
calibration models (tinyBenchmarks tunes lam on held-out models; with one pool there are
none, so the errors are in-sample). Pure JAX: `estimate` runs inside the search's program.

`item_scorer` gives the per-item correctness the split scores are the means of; `take`
cuts a split to given items.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from recycle_jax.evaluation import kinds
from recycle_jax.evaluation.task_data import TaskData
from recycle_jax.models import transformer
from recycle_jax.runtime.errors import check

PRIOR_B = 3.0  # difficulties' prior scale (abilities' is 1)


@flax.struct.dataclass
class TaskItems:
  """One task's fitted items and its subset. a, b [E]; seen [E] bool (the subset);
  sub_a, sub_b [K] (the subset's, in the subset's order); lam: the gp-IRT weight."""
  a: jax.Array
  b: jax.Array
  seen: jax.Array
  sub_a: jax.Array
  sub_b: jax.Array
  lam: jax.Array


def _neg_log_posterior(params, y):
  log_a, b, theta = params
  z = jnp.exp(log_a)[None] * (theta[:, None] - b[None])
  ll = y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)
  prior = jnp.sum(theta ** 2) + jnp.sum(log_a ** 2) + jnp.sum((b / PRIOR_B) ** 2)
  return -jnp.sum(ll) + 0.5 * prior


@functools.partial(jax.jit, static_argnames="steps")
def _fit(y, steps: int, lr: float = 0.05):
  m, e = y.shape
  params = (jnp.zeros(e), jnp.zeros(e), jnp.zeros(m))
  opt = optax.adam(lr)

  def step(carry, _):
    p, s = carry
    u, s = opt.update(jax.grad(_neg_log_posterior)(p, y), s, p)
    return (optax.apply_updates(p, u), s), None
  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  log_a, b, theta = params
  return jnp.exp(log_a), b, theta


def fit(responses: np.ndarray, steps: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """responses [M, E] in {0, 1} -> (a [E], b [E], theta [M])."""
  a, b, theta = _fit(jnp.asarray(responses, jnp.float32), steps)
  return np.asarray(a), np.asarray(b), np.asarray(theta)


def prob(theta, a, b):
  """[..., E] P(correct) at abilities theta [...]."""
  return jax.nn.sigmoid(a * (jnp.asarray(theta)[..., None] - b))


def fisher(theta, a, b):
  p = prob(theta, a, b)
  return a ** 2 * p * (1 - p)


def choose(a: np.ndarray, b: np.ndarray, around: np.ndarray, k: int) -> np.ndarray:
  """The k items of most Fisher information summed over the abilities `around`, sorted."""
  info = np.asarray(fisher(around, a, b), np.float64).sum(0)
  return np.sort(np.argsort(-info, kind="stable")[:k])


def ability(y, a, b, steps: int = 20):
  """MAP abilities [P] from answers y [P, K] on items (a, b) [K] (prior N(0, 1)): Newton
  on a concave posterior, clipped to [-8, 8]."""
  def body(theta, _):
    p = prob(theta, a, b)
    grad = jnp.sum(a * (y - p), -1) - theta
    hess = -jnp.sum(a ** 2 * p * (1 - p), -1) - 1.0
    return jnp.clip(theta - grad / hess, -8.0, 8.0), None
  theta, _ = jax.lax.scan(body, jnp.zeros(y.shape[:-1]), None, length=steps)
  return theta


def p_irt(y, items: TaskItems):
  """[P] p-IRT accuracy estimates from subset answers y [P, K]."""
  p = prob(ability(y, items.sub_a, items.sub_b), items.a, items.b)
  return (jnp.sum(y, -1) + jnp.sum(jnp.where(items.seen, 0.0, p), -1)) / items.a.shape[0]


def estimate(y, items: TaskItems):
  """[P] gp-IRT accuracy estimates (fractions) from subset answers y [P, K]."""
  return items.lam * jnp.mean(y, -1) + (1 - items.lam) * p_irt(y, items)


def calibrate(responses: np.ndarray, idx: np.ndarray, fitted) -> TaskItems:
  """The task's items with subset idx [K] and lam from the calibration models' errors."""
  a, b, _ = fitted
  seen = np.zeros(a.shape[0], bool)
  seen[idx] = True
  items = TaskItems(jnp.asarray(a), jnp.asarray(b), jnp.asarray(seen), jnp.asarray(a[idx]),
                    jnp.asarray(b[idx]), jnp.float32(0.0))
  y = jnp.asarray(responses[:, idx], jnp.float32)
  truth = responses.mean(-1)
  mse_p = float(np.mean((np.asarray(p_irt(y, items)) - truth) ** 2))
  mse_m = float(np.mean((np.asarray(y).mean(-1) - truth) ** 2))
  lam = mse_p / (mse_p + mse_m) if mse_p + mse_m > 0 else 0.0
  return items.replace(lam=jnp.float32(lam))


def plain_mean(e: int, idx: np.ndarray) -> TaskItems:
  """Items whose `estimate` is the subset's plain mean (lam = 1): a random subset's
  score, IRT's comparison at equal cost."""
  seen = np.zeros(e, bool)
  seen[idx] = True
  z = jnp.zeros(e, jnp.float32)
  return TaskItems(z + 1.0, z, jnp.asarray(seen), jnp.ones(len(idx)), jnp.zeros(len(idx)),
                   jnp.float32(1.0))


# ----------------------------------------------------------------------------- items

def item_scorer(decoder: transformer.Decoder, generation: str = "teacher_forced",
                batch_size: int = 32) -> Callable:
  """`items(params, datas)`, pure and jittable: [sum E] hits (0 or 1) of every example of
  every split, split after split, each in its examples' order, from the padded rows (a
  packed layout orders rows by length), scored as `scorers.make_scorer` scores them: a
  split's score is 100 x the mean of its hits. Padded rows are scored batch_size at a time
  (a whole 512-item split at once held 6 GB of activations per candidate)."""
  ctx = kinds._Context(decoder, generation, batch_size)

  def items(params, datas: tuple[TaskData, ...]):
    return jnp.concatenate([kinds.REGISTRY[d.kind].device(ctx, params, d.replace(packed=None))
                            for d in datas])
  return items


def check_items(datas: Sequence[TaskData], k: int) -> None:
  """IRT fitness scores items on the device and cuts each split to k of them."""
  for d in datas:
    check(not kinds.REGISTRY[d.kind].on_host, f"IRT fitness needs per-item scores on the "
          f"device; task {d.name!r} is verified on the host", "SearchConfig.irt_items",
          "search it without IRT fitness (irt_items = 0)")
    check(0 < k <= d.num_examples, f"the IRT subset of {k} items is larger than task "
          f"{d.name!r}'s dev split ({d.num_examples} examples)", "SearchConfig.irt_items",
          f"choose at most {d.num_examples} items (or a larger --dev_size)")


def take(d: TaskData, idx: np.ndarray) -> TaskData:
  """A host split cut to the examples idx (sorted), without a packed layout."""
  return jax.tree.map(lambda x: np.asarray(x)[idx], d.replace(packed=None,
                                                                examples=len(idx)))
