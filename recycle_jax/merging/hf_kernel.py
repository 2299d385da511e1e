"""The jitted kernel of a Hugging Face folder merge (`hf_merge`) for every method but
'linear' (which `hf_linear` runs in numpy): one tensor of N inputs merged in float32, cast
to the output dtype, with its finiteness checked in the same program."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from recycle_jax.merging import geometric, kernels, selection, task_vectors

# mergekit's generalized task arithmetic methods: (sparsification rule, sign consensus).
GTA = {"task_arithmetic": (None, False), "ties": ("magnitude", True),
       "dare_ties": ("random", True), "dare_linear": ("random", False),
       "breadcrumbs": ("magnitude_outliers", False),
       "breadcrumbs_ties": ("magnitude_outliers", True),
       "della": ("della_magprune", True), "della_linear": ("della_magprune", False)}
FLOATS = ("weight", "density", "gamma", "epsilon")  # per input, traced
SHARED_FLOATS = ("lambda", "t", "select_topk")  # per tensor, traced (layer gradients)


@functools.partial(jax.jit, static_argnames=("method", "base", "static", "out_dtype"))
def merge_tensor(xs, per, shared, counts, key, *, method: str, base: int | None,
                 static: tuple, out_dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One tensor of a mergekit merge, and whether its inputs [N] and its output are all
  finite (checked in the same compiled program: no pass over the tensors in numpy). For
  'linear' the inputs' flags are all True: a NaN or Inf in any input (whatever its
  weight: 0 * Inf is NaN) makes the output non-finite, which the caller then traces back.
  ('linear' runs in `hf_linear`; it stays here as the reference that is tested against.)

  xs: the inputs' tensors, in the plan's input order; per: {name: [N] float32} per input
  (0 where a parameter does not apply); shared: {name: float32 scalar}; counts: [N, 2]
  int32 exact trim counts; base: the base's position in xs or None; static: the method's
  boolean and integer options as sorted (name, value) pairs.
  """
  opt = dict(static)
  finite = (jnp.ones(len(xs), bool) if method == "linear" else
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
  xs = [x.astype(jnp.float32) for x in xs]
  nb = [i for i in range(len(xs)) if i != base]
  b = None if base is None else xs[base]
  w = per.get("weight")
  if method == "linear":
    out = sum(w[i] * x for i, x in enumerate(xs))
    out = out / jnp.sum(w) if opt["normalize"] else out
  elif method in GTA:
    sparsify, consensus = GTA[method]
    take = lambda v: v[jnp.asarray(nb)]
    out = task_vectors.combine(
        b, [xs[i] for i in nb], take(w), shared["lambda"], sparsify=sparsify,
        density=take(per["density"]), consensus=consensus, normalize=opt["normalize"],
        mergekit_rules=True, rescale=opt["rescale"], gamma=take(per["gamma"]),
        epsilon=take(per["epsilon"]), key=key, counts=counts[jnp.asarray(nb)])
  elif method == "slerp":
    out = kernels.slerp_tensors(shared["t"], b, xs[nb[0]])
  elif method == "nuslerp":
    out = geometric.nuslerp_leaf(geometric.nuslerp_t(w[nb[0]], w[nb[1]]), xs[nb[0]],
                                 xs[nb[1]], b, opt["nuslerp_row_wise"], opt["nuslerp_flatten"])
  elif method == "multislerp":
    out = geometric.multislerp_leaf([xs[i] for i in nb], w[jnp.asarray(nb)], b,
                                    opt["normalize_weights"], opt["eps"])
  elif method == "karcher":
    out = geometric.karcher_leaf(xs, jnp.full(len(xs), 1.0 / len(xs)), opt["max_iter"],
                                 opt["tol"])
  elif method == "model_stock":
    out = geometric.model_stock_leaf(b, [xs[i] for i in nb], None, opt["filter_wise"])
  elif method == "passthrough":
    out = xs[0] if opt["scale"] is None else xs[0] * opt["scale"]
  elif method == "sce":
    out = selection.sce_leaf(b, [xs[i] for i in nb], None, shared["select_topk"])
  elif method == "nearswap":
    out = selection.nearswap_leaf(b, xs[nb[0]], shared["t"])
  elif method == "arcee_fusion":
    out = selection.arcee_fusion_leaf(b, xs[nb[0]])
  else:
    raise AssertionError(method)
  out = out.astype(out_dtype)
  return out, finite, jnp.all(jnp.isfinite(out))


def arguments(plan, resolved, size):
  """A tensor's resolved parameters as merge_tensor's arguments (0 where one does not
  apply: the base's weight, a method's absent density)."""
  shared, per = resolved
  ins = plan.inputs
  value = lambda m, k: 0.0 if per[m].get(k) is None else per[m][k]
  per_arr = {k: jnp.asarray([value(m, k) for m in ins], jnp.float32) for k in FLOATS}
  shared_arr = {k: jnp.float32(v) for k, v in shared.items() if k in SHARED_FLOATS}
  static = tuple(sorted((k, v) for k, v in shared.items() if k not in SHARED_FLOATS))
  if plan.method.name == "passthrough":
    static += (("scale", per[ins[0]]["scale"]),)
  counts = jnp.asarray([task_vectors.host_counts(per[m].get("density", 1.0),
                                                 per[m].get("gamma", 0.0), size)
                        for m in ins], jnp.int32)
  return per_arr, shared_arr, counts, static
