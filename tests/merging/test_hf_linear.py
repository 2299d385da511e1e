"""The linear merge of Hugging Face folders in numpy (`hf_linear`), unit by unit on
threads: the bytes of numpy's float32 reference (w0 x0 + w1 x1 + ..., divided by the
weights' sum) for every input and output dtype, weights of any sign (zeros, -0.0,
non-powers of two), normalized or not, with units that cut tensors anywhere; within an
output ulp of the jitted kernel (`hf_kernel.merge_tensor`: XLA contracts multiply-adds
into FMAs and divides by a reciprocal)."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml

from recycle_jax.checkpoint_io import mergekit_config
from recycle_jax.merging import hf_kernel, hf_linear, hf_merge
from checkpoint_io.test_mergekit_config import _tensors, read, write_folder

WEIGHTS = (0.37, -1.0, 1.0, 0.0)


def _folders(root, dtypes):
  rng = np.random.default_rng(3)
  base = _tensors(rng, np.float32)
  out = []
  for i, dtype in enumerate(dtypes):
    t = {}
    for k, v in base.items():
      x = (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32)
      x.reshape(-1)[::5] = 0.0  # zeros times a negative weight: -0.0 terms
      x.reshape(-1)[1::7] = -0.0
      t[k] = x.astype(dtype)
    out.append(write_folder(str(root / f"m{i}"), t))
  return out


@pytest.mark.parametrize("in_dtypes,out_dtype,normalize", [
    ((ml_dtypes.bfloat16,) * 4, "bfloat16", True),
    ((ml_dtypes.bfloat16,) * 4, "bfloat16", False),
    ((np.float32, ml_dtypes.bfloat16, np.float16, np.float32), "float32", True),
    ((np.float32,) * 4, "float16", False)])
def test_equals_numpy_bit_for_bit_and_the_kernel_within_an_ulp(tmp_path, monkeypatch, in_dtypes, out_dtype,
                                       normalize):
  models = _folders(tmp_path, in_dtypes)
  cfg = tmp_path / "merge.yml"
  cfg.write_text(yaml.safe_dump({
      "merge_method": "linear", "dtype": out_dtype,
      "parameters": {"normalize": normalize},
      "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, WEIGHTS)]}))
  plan = mergekit_config.load(str(cfg))
  monkeypatch.setattr(hf_linear, "UNIT", 7)  # units cut rows and tensors anywhere
  got = read(hf_merge.merge(plan, str(tmp_path / "out"), fsync=False))
  xs = [read(m) for m in models]
  w = np.asarray(WEIGHTS, np.float32)
  per = {k: jnp.zeros(4, jnp.float32) for k in hf_kernel.FLOATS}
  per["weight"] = jnp.asarray(w)
  eps = float(ml_dtypes.finfo(np.dtype(out_dtype)).eps)
  for k, v in got.items():
    f = [x[k].astype(np.float32) for x in xs]
    want = w[0] * f[0]
    for wi, fi in zip(w[1:], f[1:]):
      want = want + wi * fi
    if normalize:
      want = want / np.float32(np.float32(np.float32(w[0] + w[1]) + w[2]) + w[3])
    want = want.astype(np.dtype(out_dtype))
    assert v.dtype == want.dtype and v.shape == want.shape, k
    assert v.tobytes() == want.tobytes(), k
    kernel, _, _ = hf_kernel.merge_tensor(
        [x[k] for x in xs], per, {}, jnp.zeros((4, 2), jnp.int32), None, method="linear",
        base=None, static=(("normalize", normalize),), out_dtype=jnp.dtype(out_dtype))
    np.testing.assert_allclose(np.asarray(kernel, np.float64), v.astype(np.float64),
                               rtol=eps, atol=4 * eps)
