"""SCE, NearSwap and Arcee Fusion against a transcription of mergekit 0.1.5's torch code
(mergekit/merge_methods/sce.py, nearswap.py, arcee_fusion.py and the sign mask of
generalized_task_arithmetic.py), on small random tensors, and `merge --config` of each on
small safetensors folders."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from recycle_jax import cli
from recycle_jax.merging import methods, selection


# ----------------------------------------------------------------------------- mergekit 0.1.5

def mk_get_mask(delta, mask_dtype):
  sign = delta.sign().to(mask_dtype)
  majority_sign = (delta.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
  return sign == majority_sign


def mk_sce_weight(tvs):
  weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
  weight_sum = torch.sum(weights).item()
  if abs(weight_sum) < 1e-6:
    return torch.ones_like(weights) / weights.shape[0]
  return weights / weight_sum


def mk_sce_mask(tvs, density, mask_dtype=None):
  if density <= 0:
    return torch.zeros_like(tvs[0], dtype=mask_dtype)
  if density >= 1:
    return torch.ones_like(tvs[0], dtype=mask_dtype)
  var = torch.var(tvs, dim=0, unbiased=False)
  nonzero = torch.count_nonzero(var)
  k = int(nonzero * density)
  if k == 0:
    return torch.zeros_like(var, dtype=mask_dtype)
  _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
  mask = torch.zeros_like(var, dtype=mask_dtype)
  mask.view(-1)[indices] = 1
  return mask


def mk_sce(tensors, base_tensor, select_topk=1.0):
  mask_dtype = base_tensor.dtype
  task_vectors = torch.stack([t - base_tensor for t in tensors], dim=0)
  if select_topk < 1:
    task_vectors = task_vectors * mk_sce_mask(task_vectors, select_topk, mask_dtype).unsqueeze(0)
  erase_mask = mk_get_mask(task_vectors, mask_dtype)
  tv_weights = mk_sce_weight(task_vectors)
  while tv_weights.dim() < task_vectors.dim():
    tv_weights = tv_weights.unsqueeze(-1)
  erased_weights = tv_weights * erase_mask
  merged_tv = (task_vectors * erased_weights).sum(dim=0)
  return base_tensor + merged_tv / torch.sum(erased_weights, dim=0).clamp(min=1e-6)


def mk_nearswap(a, b, t):
  weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
  return weight * b + (1 - weight) * a


def mk_arcee_fusion(base, x):
  diff = (x - base).abs()
  p = F.softmax(x, dim=-1) + 1e-8
  q = F.softmax(base, dim=-1) + 1e-8
  importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
  sorted_tensor, _ = torch.sort(importance.reshape(-1))  # <= 10^6 entries: no sampling
  idx = (torch.tensor([0.25, 0.5, 0.75]) * (sorted_tensor.numel() - 1)).long()
  q1, median, q3 = sorted_tensor[idx]
  mask = (importance >= median + 1.5 * (q3 - q1)).float()
  return base + (x - base) * mask


# ----------------------------------------------------------------------------- parity

SHAPES = [(37,), (5, 3, 4), (64, 33)]


def _arrays(n, shape, seed, scale=0.1):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=shape).astype(np.float32)
  return base, [(base + scale * rng.normal(size=shape)).astype(np.float32) for _ in range(n)]


def _t(xs):
  return [torch.tensor(x) for x in xs]


@pytest.mark.parametrize("shape", SHAPES)
def test_sce_equals_mergekit(shape):
  base, xs = _arrays(3, shape, len(shape))
  xs[1][..., :2] = base[..., :2]  # entries no model changes: zero variance, not counted
  leaf = jax.jit(selection.sce_leaf)  # select_topk traced, as a searched value is
  for topk in (1.0, 0.7, 0.3, 0.01, 0.0):
    want = mk_sce(_t(xs), torch.tensor(base), topk).numpy()
    got = leaf(jnp.asarray(base), [jnp.asarray(x) for x in xs], None, jnp.float32(topk))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # recycle_jax's uniform weights on the simplex merge as mergekit's (it has none)
    uni = leaf(jnp.asarray(base), [jnp.asarray(x) for x in xs], jnp.full(3, 1 / 3), topk)
    np.testing.assert_allclose(np.asarray(uni), want, rtol=1e-5, atol=1e-6)


def test_sce_selects_by_variance_and_erases_sign_conflicts():
  base = np.zeros(4, np.float32)
  xs = [np.array([1.0, 0.1, -2.0, 0.0], np.float32), np.array([-1.0, 0.1, 2.5, 0.0], np.float32)]
  got = np.asarray(selection.sce_leaf(jnp.asarray(base), [jnp.asarray(x) for x in xs], None, 0.5))
  # variance: [1, 0, 5.06, 0] -> the top floor(2 * 0.5) = 1 of 2 non-zero is entry 2;
  # its sum 0.5 > 0 keeps model 2's +2.5 alone
  np.testing.assert_allclose(got, [0.0, 0.0, 2.5, 0.0])
  np.testing.assert_allclose(
      got, mk_sce(_t(xs), torch.tensor(base), 0.5).numpy())


@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_equals_mergekit(shape):
  base, (x,) = _arrays(1, shape, 7)
  x.ravel()[:3] = base.ravel()[:3]  # identical entries: |a - b| floored at 1e-6
  leaf = jax.jit(selection.nearswap_leaf)
  for t in (1e-4, 0.05, 0.5):
    want = mk_nearswap(torch.tensor(base), torch.tensor(x), t).numpy()
    got = leaf(jnp.asarray(base), jnp.asarray(x), jnp.float32(t))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES + [(1, 1)])
def test_arcee_fusion_equals_mergekit(shape):
  base, (x,) = _arrays(1, shape, 11, scale=0.5)
  want = mk_arcee_fusion(torch.tensor(base), torch.tensor(x)).numpy()
  got = np.asarray(jax.jit(selection.arcee_fusion_leaf)(jnp.asarray(base), jnp.asarray(x)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  moved = got != base
  assert 0 < moved.mean() < 1 or np.prod(shape) < 4  # some changes taken, not all


def test_pool_of_one_is_mergekits_merge_and_weights_average_the_pool():
  """nearswap / arcee_fusion of a pool of one: mergekit's; of N: of the weighted average."""
  rng = np.random.default_rng(3)
  base = {"w": rng.normal(size=(8, 5)).astype(np.float32)}
  pool = tuple({"w": base["w"] + 0.2 * rng.normal(size=(8, 5)).astype(np.float32)}
               for _ in range(3))
  a = np.array([0.2, 0.5, 0.3], np.float32)
  avg = sum(w * p["w"] for w, p in zip(a, pool))
  for name, ref in (("nearswap", lambda b, x: mk_nearswap(b, x, 0.05)),
                    ("arcee_fusion", mk_arcee_fusion)):
    hp = {"nearswap_t": 0.05} if name == "nearswap" else {}
    one = methods.merge(name, np.ones(1, np.float32), pool[:1], base, **hp)
    np.testing.assert_allclose(one["w"], ref(torch.tensor(base["w"]),
                                             torch.tensor(pool[0]["w"])).numpy(), atol=1e-6)
    many = methods.merge(name, a, pool, base, **hp)
    np.testing.assert_allclose(many["w"], ref(torch.tensor(base["w"]),
                                              torch.tensor(avg)).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- merge --config

LAYERS = 2


def _folder(path, tensors):
  from recycle_jax.checkpoint_io import safetensors_io
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "num_hidden_layers": LAYERS, "torch_dtype": "float32"},
              f)
  w = safetensors_io.Writer(path, [(k, v.dtype, v.shape) for k, v in tensors.items()])
  for k, v in tensors.items():
    w.write(k, v)
  w.close(fsync=False)
  return path


def _read(folder):
  from safetensors.numpy import load_file
  return {k: v for f in os.listdir(folder) if f.endswith(".safetensors")
          for k, v in load_file(os.path.join(folder, f)).items()}


@pytest.mark.parametrize("method", ["sce", "nearswap", "arcee_fusion"])
def test_merge_config_equals_mergekit(tmp_path, method):
  """`recycle-jax merge --config` of each method (a layer gradient for its parameter)
  against the transcription, tensor by tensor; mergekit's input counts are enforced."""
  rng = np.random.default_rng(5)
  shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
            **{f"model.layers.{i}.mlp.up_proj.weight": (12, 8) for i in range(LAYERS)}}
  base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  n = 3 if method == "sce" else 1
  models = [{k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32)
             for k, v in base.items()} for _ in range(n)]
  paths = [_folder(str(tmp_path / f"m{i}"), m) for i, m in enumerate(models)]
  grad = {"sce": {"select_topk": [0.3, 0.8]}, "nearswap": {"t": [0.01, 0.2]},
          "arcee_fusion": {}}[method]
  cfg = {"merge_method": method, "base_model": _folder(str(tmp_path / "base"), base),
         "dtype": "float32", "models": [{"model": p} for p in paths], "parameters": grad}
  (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
  out = tmp_path / "out"
  assert cli.main(["merge", f"--config={tmp_path / 'm.yml'}", f"--output={out}"]) == 0
  got = _read(str(out))
  for k, v in got.items():
    t = (int(k.split(".")[2]) / (LAYERS - 1)) if ".layers." in k else 0.0
    p = {name: vals[0] + t * (vals[1] - vals[0]) for name, vals in grad.items()}
    b, xs = torch.tensor(base[k]), _t([m[k] for m in models])
    want = {"sce": lambda: mk_sce(xs, b, p.get("select_topk")),
            "nearswap": lambda: mk_nearswap(b, xs[0], p.get("t")),
            "arcee_fusion": lambda: mk_arcee_fusion(b, xs[0])}[method]().numpy()
    np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6, err_msg=k)
  if method != "sce":  # one model besides the base, as mergekit's contract says
    cfg["models"].append({"model": _folder(str(tmp_path / "extra"), models[0])})
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["merge", f"--config={tmp_path / 'm.yml'}",
                     f"--output={tmp_path / 'out2'}"]) == 2
    assert not (tmp_path / "out2").exists()
