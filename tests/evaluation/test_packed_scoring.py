"""The packed scoring layout gives the padded scorers' hits exactly, and teacher-forced
exact match on it equals greedy decoding's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.evaluation import task_data
from recycle_jax.evaluation import task_splits
from recycle_jax.evaluation import scorers
from recycle_jax.evaluation import kinds
from recycle_jax.models import transformer

CFG = transformer.ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)


def _noisy(seed=3, scale=20.0):
  """Large random weights: varied greedy tokens and well-separated log-likelihoods."""
  return jax.tree.map(lambda x: x * scale, transformer.init_params(CFG, jax.random.key(seed)))


def _padded(d):
  return d.replace(packed=None)


def _own_greedy_targets(dec, params, d, new=6):
  """A generation split whose targets are the model's own greedy continuations (so exact
  match is not always 0), every other one spoiled in its last token."""
  prompts = [list(p[:n]) for p, n in zip(np.asarray(d.prompts), np.asarray(d.prompt_lens))]
  out = np.asarray(jax.jit(dec.greedy_decode, static_argnums=3)(
      params, d.prompts, d.prompt_lens, new))
  targets = []
  for i, row in enumerate(out):
    t = [int(x) for x in row[:2 + i % (new - 1)]]
    if i % 2:
      t[-1] = 3 + (t[-1] + 1) % 200
    targets.append(t)
  tokens, mask = task_data._sequences(prompts, targets)
  plain = task_data.TaskData(
      tokens=tokens, target_mask=mask, kind="exact", name="own",
      prompts=task_data._pad(prompts, task_data._round_up(max(map(len, prompts)))),
      prompt_lens=np.array([len(p) for p in prompts], np.int32),
      targets=task_data._pad(targets, max(map(len, targets))),
      target_lens=np.array([len(t) for t in targets], np.int32))
  return plain.replace(packed=task_data.pack(plain))


@pytest.mark.slow  # 20-40 s: `make test-slow` (CI); keeps `make test` under 15 min
def test_packed_choice_scores_equal_padded():
  dec = transformer.Decoder(CFG)
  datas = task_splits.load_split(["rj_reasoning", "rj_knowledge"], "dev", 48, transformer.VOCAB)
  for seed in (0, 1, 2):
    params = _noisy(seed, 5.0)
    packed = scorers.make_scorer(dec)(params, datas)
    for d, s in zip(datas, np.asarray(packed)):
      hits = kinds.rank_classification(dec.apply, params, _padded(d))
      assert round(float(s) * d.num_examples / 100) == int(jnp.sum(hits))
    assert len(set(np.asarray(packed).tolist())) > 1  # not a constant comparison


def test_packed_teacher_forcing_equals_greedy_and_padded():
  dec = transformer.Decoder(CFG)
  params = _noisy()
  d = _own_greedy_targets(
      dec, params, task_splits.materialize("rj_instruct", "dev", 24, transformer.VOCAB))
  tf = scorers.make_scorer(dec, "teacher_forced")(params, (d,))
  greedy = scorers.make_scorer(dec, "greedy")(params, (d,))
  padded = kinds.teacher_forced_exact_match(dec.apply, params, _padded(d))
  assert 0 < float(tf[0]) < 100
  np.testing.assert_array_equal(tf, greedy)
  assert round(float(tf[0]) * d.num_examples / 100) == int(jnp.sum(padded))
  chunked = scorers.make_scorer(dec, batch_size=5)(params, (d,))
  np.testing.assert_array_equal(tf, chunked)


def test_pack_covers_every_example_once_and_trims():
  for name in ("rj_instruct", "rj_reasoning", "rj_knowledge"):
    d = task_splits.materialize(name, "dev", 40, transformer.VOCAB)
    assert sum(p.tokens.shape[0] for p in d.packed) == d.num_examples
    assert len(d.packed) <= 4
    packed_tokens = sum(p.tokens.size for p in d.packed)
    assert packed_tokens <= d.tokens.size
    scored = sum(int(np.sum(p.slot_group >= 0)) for p in d.packed)
    wanted = int(np.sum(np.asarray(d.target_mask)[..., 1:]))
    assert scored == wanted


@pytest.mark.slow  # ~12 s: `make test-slow` (CI); keeps `make test` under 15 min
def test_placed_splits_score_the_same_with_rows_split_over_data():
  """task_data.place: packed rows padded and split over the mesh's 'data' axis (each of
  the 8 devices holds 1/8 of them), the same scores as unplaced splits, and pad rows add
  no hit even where every real row is a hit."""
  from recycle_jax.models import partitioning
  dec = transformer.Decoder(CFG)
  mesh = partitioning.make_mesh()  # ('data', 'model') = (8, 1)
  # 44: pads needed
  datas = task_splits.load_split(["rj_reasoning", "rj_instruct"], "dev", 44, transformer.VOCAB)
  placed = task_data.place(datas, mesh)
  for d in placed:
    for p in d.packed:
      rows = p.tokens.shape[0]
      assert rows % 8 == 0
      assert {s.data.shape[0] for s in p.tokens.addressable_shards} == {rows // 8}
  score = jax.jit(scorers.make_scorer(dec))
  for seed in (0, 1):
    params = jax.device_put(_noisy(seed, 5.0), partitioning.replicated(mesh))
    np.testing.assert_array_equal(np.asarray(score(params, placed)),
                                  np.asarray(score(params, datas)))
  # A bucket whose every real row is a hit: padding must not add any.
  p = datas[1].packed[0]
  full = p.replace(slot_group=np.full_like(p.slot_group, -1))  # no scored slot: all "hit"?
  padded = task_data.pad_rows(p, 8 * p.tokens.shape[0])
  hits = kinds.packed_hits(dec, _noisy(), padded)
  assert float(jnp.sum(hits[p.tokens.shape[0]:])) == 0.0
  assert float(jnp.sum(kinds.packed_hits(dec, _noisy(), full))) == 0.0
