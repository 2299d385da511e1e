"""Helpers only the tests use: reference merges and the model as a plain apply function."""
import jax

from recycle_jax.merging import kernels
from recycle_jax.models import transformer


def linear_population(alphas, pool):
  """alphas: [P, N] -> trees with a leading population axis [P, ...]."""
  return jax.vmap(kernels.linear, in_axes=(0, None))(alphas, pool)


def linear_checked(alphas, pool):
  """The linear merge and whether it is all finite."""
  merged = kernels.linear(alphas, pool)
  return merged, kernels.all_finite(merged)


def make_apply(cfg: transformer.ModelConfig):
  """The model as `apply(params, tokens [B, L]) -> logits [B, L, V]`."""
  model = transformer.Transformer(cfg)
  return lambda params, tokens: model.apply({"params": params}, tokens)
