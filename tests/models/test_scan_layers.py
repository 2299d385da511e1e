"""The model's alternative execution paths agree with the plain one: blocks under nn.scan
(ModelConfig.scan_layers) give the unrolled logits and tokens (their parameters stacked in
or outside the program), and the vocabulary-chunked
head (scored_tokens) gives the full log-softmax and argmax."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.models import decoding, transformer

# Gemma-3-like: sliding and full layers, local RoPE base, q/k norms, sandwich norms.
CFG = transformer.ModelConfig(
    vocab_size=300, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=64,
    head_dim=8, qk_norm=True, norm_offset=1.0, sandwich_norms=True, embed_scale=True,
    activation="gelu_pytorch_tanh", sliding_window=4, local_rope_theta=10_000.0,
    rope_theta=1e6, layer_types=(transformer.SLIDING, transformer.FULL, transformer.SLIDING))
SCANNED = dataclasses.replace(CFG, scan_layers=True)


def _params(cfg=CFG):
  params = transformer.init_params(cfg, jax.random.key(0))
  return jax.tree.map(lambda x: x * 3.0, params)  # sharper outputs


@pytest.mark.slow  # ~12 s: `make test-slow` (CI); keeps `make test` under 15 min
def test_scanned_blocks_give_the_unrolled_logits_and_tokens():
  params = _params()
  assert "layer_2" in transformer.init_params(SCANNED, jax.random.key(0))  # stored layout
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 3, CFG.vocab_size)
  plain = transformer.Decoder(CFG).apply(params, tokens)
  scanned = transformer.Decoder(SCANNED).apply(params, tokens)
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(plain), rtol=0, atol=1e-5)
  prompts = np.asarray(tokens[:, :6])
  lens = np.array([6, 4], np.int32)
  stops = decoding.stop_ids([], transformer.EOS_ID)
  out = [np.asarray(jax.jit(decoding.generate, static_argnums=0)(
      transformer.Decoder(c), params, decoding.Prompts(prompts, lens, stops, 10)))
      for c in (CFG, SCANNED)]
  assert out[0].tolist() == out[1].tolist()


def test_stacking_outside_a_program_frees_the_layers_and_gives_the_same_stack():
  params = _params()
  want = transformer.stack_layers(SCANNED, params)
  given = dict(params)
  got = transformer.stack_layers_freeing(SCANNED, given)
  assert given == {}  # emptied: nothing else holds the per-layer arrays
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 3, CFG.vocab_size)
  np.testing.assert_array_equal(np.asarray(transformer.Decoder(SCANNED).apply(got, tokens)),
                                np.asarray(transformer.Decoder(SCANNED).apply(params, tokens)))
  assert transformer.stack_layers_freeing(CFG, params) is params  # unrolled: unchanged


def test_chunked_head_gives_the_full_log_softmax_and_argmax():
  params = _params()
  dec = transformer.Decoder(CFG)
  tokens = jax.random.randint(jax.random.key(2), (3, 9), 3, CFG.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(9), (3, 9))
  segments = jnp.zeros((3, 9), jnp.int32)
  gather = jnp.array([[0, 3, 5], [1, 2, 8], [4, 6, 7]])
  targets = jax.random.randint(jax.random.key(3), (3, 3), 0, CFG.vocab_size)
  logits = dec.apply_packed(params, tokens, positions, segments, gather)
  want_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  x = dec.module.apply({"params": params}, tokens, positions, segments=segments,
                       gather=gather, head=False)
  for chunk in (7, 64, 300, 1024):  # 300 % 7 and 300 % 64 leave an overlapping last chunk
    lp, top = transformer.scored_tokens(CFG, params, x, targets, chunk)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(want_lp), rtol=0, atol=1e-5)
    assert np.asarray(top).tolist() == np.asarray(jnp.argmax(logits, -1)).tolist()
  lp, top = dec.score_packed(params, tokens, positions, segments, gather, targets)
  np.testing.assert_allclose(np.asarray(lp), np.asarray(want_lp), rtol=0, atol=1e-5)
