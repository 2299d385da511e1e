"""On-device greedy generation: same tokens as the KV-cache decoder, stops where told."""
import jax
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


def _first_text_hit(vocab, row, stops):
  """Steps to keep: the first prefix of `row` whose decoded text contains a stop."""
  for n in range(1, len(row) + 1):
    if any(s in vocab.decode(list(row[:n])) for s in stops):
      return n
  return len(row)


def test_stop_tables_match_the_decoded_text_of_every_prefix(tmp_path):
  """A real byte-level BPE tokenizer: the automaton hits at exactly the first prefix whose
  decoded text contains the stop, whether the stop lies inside one token, spans several,
  or comes at the first token."""
  import hf_fixtures
  from recycle_jax.checkpoint_io import tokenizer_files
  from recycle_jax.evaluation import vocabularies
  hf_fixtures.train_bpe(str(tmp_path / "tok"), vocab_size=300,
                        text=hf_fixtures.TEXT + " \n\n the\n\ncat \n ok\n")
  vocab = vocabularies.of(tokenizer_files.huggingface(str(tmp_path / "tok")))
  texts = [vocab.decode([v]) for v in range(vocab.vocab_size)]
  inside = max(texts, key=len)  # a multi-character token
  assert len(inside) >= 3
  stops = ("\n", inside[1:3], "at .")
  table = decoding.stop_tables(vocab, stops)
  assert table.shape == (3, 1 + 4, vocab.vocab_size)
  rng = np.random.default_rng(0)
  plain = [v for v, t in enumerate(texts) if t and "\n" not in t]
  for trial in range(300):
    row = rng.choice(plain, 12).tolist()
    if trial % 3 == 0:  # plant a token holding the stop, or its pieces, mid-row
      row[5:7] = vocab.encode(rng.choice([inside, "\n\n", "cat .", " sat ."]))[:2]
    for s_i, stop in enumerate(stops):
      state, hit = 0, len(row)
      for n, v in enumerate(row):
        state = table[s_i, 0 if n == 0 else 1 + state, v]
        if state == decoding.HIT:
          hit = n + 1
          break
      assert hit == _first_text_hit(vocab, row, (stop,)), (row, stop)


def test_text_stops_end_rows_on_device():
  """Byte vocabulary: generation stops at the first step whose text contains a stop
  (one spanning two tokens, one of one token), rows finishing at different steps; the
  halving stages and row groups leave every token where it was."""
  dec, params, prompts, lens = _setup()
  vocab = transformer.VOCAB
  prompts = np.concatenate([prompts, prompts[::-1]])
  lens = np.concatenate([lens, lens[::-1]])
  full = np.asarray(GEN(dec, params, decoding.Prompts(prompts, lens, _stops([]), max_new=12)))
  text = vocab.decode([t for t in full[0, 3:5].tolist() if t >= 3])
  stops = (text, vocab.decode([int(full[1, 0])]))
  table = decoding.stop_tables(vocab, tuple(s for s in stops if s))
  for groups in (1, 2):
    got = np.asarray(GEN(dec, params, decoding.Prompts(
        prompts, lens, _stops([]), 12, table, groups)))
    for f, o in zip(full, got):
      n = _first_text_hit(vocab, f, [s for s in stops if s])
      assert o[:n].tolist() == f[:n].tolist() and set(o[n:].tolist()) <= {decoding.NO_TOKEN}


def test_stage_sizes_halve_to_one():
  assert decoding.stage_sizes(12) == (12, 6, 3, 2, 1)
  assert decoding.stage_sizes(1) == (1,)
