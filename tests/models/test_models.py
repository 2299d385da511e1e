"""The transformer: KV-cache decoding agrees with full recomputation; scorers agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.evaluation import task_splits
from recycle_jax.evaluation import scorers
from recycle_jax.evaluation import kinds
from recycle_jax.models import transformer
import tree_helpers


def _trained(micro_pool):
  pool = pool_manifest.load_pool(micro_pool)
  meta = checkpoints.validate_pool(pool)
  cfg = transformer.ModelConfig(**meta.model_config)
  return cfg, checkpoints.restore(pool.paths[1], meta.abstract)


def test_kv_cache_decoding_matches_uncached(micro_pool):
  cfg, trained = _trained(micro_pool)
  # A random model with large weights too: it emits varied tokens, never an early EOS.
  noisy = jax.tree.map(lambda x: x * 20, transformer.init_params(cfg, jax.random.key(3)))
  dec = transformer.Decoder(cfg)
  d = task_splits.materialize("rj_math", "dev", 16, transformer.VOCAB)
  cached_fn = jax.jit(dec.greedy_decode, static_argnums=3)
  plain_fn = jax.jit(transformer.greedy_decode_uncached, static_argnums=(0, 4))
  for params in (trained, noisy):
    cached = cached_fn(params, d.prompts, d.prompt_lens, 8)
    plain = plain_fn(dec.apply, params, d.prompts, d.prompt_lens, 8)
    np.testing.assert_array_equal(cached, plain)
  assert len(np.unique(np.asarray(cached))) > 4  # the comparison is not between constants


@pytest.mark.slow  # 20-40 s: `make test-slow` (CI); keeps `make test` under 15 min
def test_teacher_forced_exact_match_equals_greedy(micro_pool):
  cfg, params = _trained(micro_pool)
  dec = transformer.Decoder(cfg)
  datas = task_splits.load_split(["rj_instruct"], "dev", 32, transformer.VOCAB)  # `exact`
  tf = scorers.make_scorer(dec, generation="teacher_forced")(params, datas)
  greedy = scorers.make_scorer(dec, generation="greedy")(params, datas)
  np.testing.assert_allclose(tf, greedy)


@pytest.mark.slow  # 20-40 s: `make test-slow` (CI); keeps `make test` under 15 min
def test_chunked_scoring_matches_unchunked(micro_pool):
  cfg, params = _trained(micro_pool)
  dec = transformer.Decoder(cfg)
  datas = task_splits.load_split(["rj_knowledge", "rj_instruct"], "dev", 20, transformer.VOCAB)
  a = scorers.make_scorer(dec)(params, datas)
  b = scorers.make_scorer(dec, batch_size=8)(params, datas)
  np.testing.assert_allclose(a, b, atol=1e-4)
  assert np.all((np.asarray(a) >= 0) & (np.asarray(a) <= 100))


def test_rank_classification_picks_the_likeliest_choice():
  cfg = transformer.ModelConfig(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32)
  params = transformer.init_params(cfg, jax.random.key(0))
  dec = transformer.Decoder(cfg)
  d = task_splits.materialize("rj_reasoning", "dev", 8, transformer.VOCAB)
  lp = np.asarray(kinds.choice_logprobs(dec.apply, params, d))
  hits = np.asarray(kinds.rank_classification(dec.apply, params, d))
  np.testing.assert_array_equal(hits, (lp.argmax(-1) == np.asarray(d.labels)).astype(float))


def test_gqa_and_untied_model_shapes():
  cfg = transformer.ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                           tie_embeddings=False)
  params = transformer.init_params(cfg, jax.random.key(0))
  assert params["layer_0"]["attn"]["k"]["kernel"].shape == (32, 16)
  assert params["lm_head"]["kernel"].shape == (32, cfg.vocab_size)
  logits = tree_helpers.make_apply(cfg)(params, jnp.ones((2, 5), jnp.int32))
  assert logits.shape == (2, 5, cfg.vocab_size) and logits.dtype == jnp.float32


def test_tasks_have_disjoint_splits_and_verified_answers():
  from recycle_jax.tasks import embedded
  for name in embedded.HELD_IN + embedded.HELD_OUT:
    it = embedded.items(name)
    splits = [set(r["inputs"] for r in it[s]) for s in ("train", "dev", "test")]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2])
    assert not (splits[1] & splits[2])
    assert len(it["dev"]) == len(it["test"]) == embedded.DEV_BASE
  for name in embedded.HELD_OUT:
    assert embedded.items(name)["train"] == []
  row = embedded.items("rj_code")["dev"][0]
  assert embedded._run(row["inputs"].rsplit("\n# ", 1)[0]) == row["targets"]
