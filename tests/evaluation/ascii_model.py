"""A tiny model whose greedy outputs are 'a', 'b', ' ' or EOS (so some rows end early), and
its own greedy texts: the model the kind and samples tests score end to end."""
import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.evaluation import task_data
from recycle_jax.models import decoding, transformer

CFG = transformer.ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
PROMPTS = ["Q: cat", "Q: a dog", "Q: owl!", "Q: bee bee", "Q: fox", "Q: yak?", "Q: hen",
           "Q: emu emu emu", "Q: ant", "Q: pig"]  # 10 examples: 8 data shards need pads


def ascii_model(seed=1):
  """Random weights with the embedding rows (tied head) of every other token zeroed: their
  logits are 0, and one of the four kept logits is almost surely above 0."""
  params = jax.tree.map(lambda x: 10.0 * x, transformer.init_params(CFG, jax.random.key(seed)))
  keep = np.zeros(CFG.vocab_size, bool)
  keep[[transformer.EOS_ID] + [3 + ord(c) for c in "ab "]] = True
  emb = params["embed"]["embedding"]
  params["embed"]["embedding"] = jnp.where(keep[:, None], emb, 0.0)
  return params


def own_texts(dec, params, n=8) -> list[str]:
  """The model's greedy continuations of PROMPTS, n tokens at most."""
  enc = [transformer.VOCAB.encode(p) for p in PROMPTS]
  g = decoding.Prompts(task_data._pad(enc, 16), np.array([len(e) for e in enc], np.int32),
                       decoding.stop_ids([]), max_new=n)
  return decoding.texts(transformer.VOCAB, np.asarray(
      jax.jit(decoding.generate, static_argnums=0)(dec, params, g)))
