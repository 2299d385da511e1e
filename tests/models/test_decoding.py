"""On-device greedy generation: same tokens as the KV-cache decoder, stops where told."""
import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.models import decoding, transformer


GEN = jax.jit(decoding.generate, static_argnums=0)


def _stops(encoded):
  """Stop ids of one fixed shape [2, 2], so every case runs the same compiled program."""
  out = np.full((2, 2), decoding.NO_TOKEN, np.int32)
  ids = decoding.stop_ids(encoded)
  out[:ids.shape[0], 2 - ids.shape[1]:] = ids
  return out


def _setup():
  cfg = transformer.ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
  dec = transformer.Decoder(cfg)
  params = transformer.init_params(cfg, jax.random.key(0))
  # Sharpen the head so greedy outputs vary with the prompt (random init is near-uniform).
  params = jax.tree.map(lambda x: x * 4.0, params)
  prompts = np.array([[5, 6, 7, 0], [9, 10, 0, 0], [11, 12, 13, 14]], np.int32)
  lens = np.array([3, 2, 4], np.int32)
  return dec, params, prompts, lens


def test_matches_the_kv_cache_decoder_without_stops():
  dec, params, prompts, lens = _setup()
  want = jax.jit(dec.greedy_decode, static_argnums=3)(params, prompts, lens, 12)
  got = GEN(dec, params, decoding.Prompts(prompts, lens, _stops([[transformer.EOS_ID]]),
                                          max_new=12))
  want = np.asarray(want)
  # Identical up to each row's first EOS (a stop sequence); NO_TOKEN after it.
  for w, o in zip(want, np.asarray(got)):
    n = list(w).index(transformer.EOS_ID) + 1 if transformer.EOS_ID in w else len(w)
    assert o[:n].tolist() == w[:n].tolist() and set(o[n:].tolist()) <= {decoding.NO_TOKEN}


def test_stop_sequences_end_rows_and_the_loop_exits_early():
  dec, params, prompts, lens = _setup()
  full = np.asarray(GEN(dec, params, decoding.Prompts(prompts, lens, _stops([]), max_new=12)))
  # Stop on the 2-token sequence row 0 produces at steps 3-4, and on row 1's first token.
  stops = [full[0, 3:5].tolist(), full[1, :1].tolist()]
  got = np.asarray(GEN(dec, params, decoding.Prompts(prompts, lens, _stops(stops),
                                                      max_new=12)))
  first_hit = lambda row: min(
      [i + len(s) for s in stops for i in range(len(row) - len(s) + 1)
       if row[i:i + len(s)].tolist() == s] + [len(row)])
  for f, o in zip(full, got):
    n = first_hit(f)
    assert o[:n].tolist() == f[:n].tolist() and set(o[n:].tolist()) <= {decoding.NO_TOKEN}
  # Every row stops on its first token (the loop then exits after one step).
  firsts = sorted({int(t) for t in full[:, 0]})[:2]
  out = np.asarray(GEN(dec, params, decoding.Prompts(prompts, lens,
                                                       _stops([[t] for t in firsts]), 12)))
  for f, o in zip(full, out):
    if f[0] in firsts:
      assert o[0] == f[0] and (o[1:] == decoding.NO_TOKEN).all()


def test_texts_cut_at_eos():
  vocab = transformer.VOCAB
  rows = np.array([vocab.encode("ab") + [transformer.EOS_ID, 70],
                   vocab.encode("xyz") + [decoding.NO_TOKEN]])
  assert decoding.texts(vocab, rows) == ["ab", "xyz"]
  assert decoding.stop_ids([[5, 6]], eos_id=1).tolist() == [[-1, 1], [5, 6]]
