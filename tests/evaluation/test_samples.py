"""Per-item records of the built-in kinds (`evaluation.samples`, `eval --log_samples`): in
lm-eval's samples format (written byte for byte as lm-eval's EvaluationTracker writes
the same records), and each task's score is 100 x the mean of its metric over its
records, for every kind and metric, also with the examples placed over the mesh."""
import copy
import json

import jax
import numpy as np
import pytest

from ascii_model import CFG, PROMPTS, ascii_model, own_texts
from recycle_jax.evaluation import samples, scorers, task_data, task_splits
from recycle_jax.evaluation.verifiers import REGISTRY as VERIFIERS
from recycle_jax.models import partitioning, transformer
from recycle_jax.tasks import harness, jsonl
from recycle_jax.tasks.jsonl import JsonlTask

LM_EVAL_KEYS = ["doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter",
                "metrics", "doc_hash", "prompt_hash", "target_hash"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Tasks of every built-in kind and metric over one JSONL file each, on the model."""
  tmp = tmp_path_factory.mktemp("samples")
  dec, params = transformer.Decoder(CFG), ascii_model()
  own = own_texts(dec, params)
  texts = [t if i % 2 == 0 else t + " zq" for i, t in enumerate(own)]  # 5 of 10 right
  rows = [{"p": p, "c": ["yes", "no", "maybe", "a b"][:2 + i % 3], "y": i % 2,
           "a": t, "n": str(i)} for i, (p, t) in enumerate(zip(PROMPTS, texts))]
  path = tmp / "test.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  specs = {f"s_choice_{m}": dict(kind="choice", choices="c", label="y", metric=m)
           for m in ("acc", "acc_norm")}
  specs.update({
      "s_exact_eos": dict(kind="exact", target="{a}", target_delimiter="",
                          metric="is_greedy_eos"),
      "s_exact": dict(kind="exact", target="{a}"),
      "s_generate": dict(kind="generate", target="{a}", verifier="exact_match",
                         max_new_tokens=8),
      "s_numeric": dict(kind="generate", target="{n}", verifier="numeric",
                        max_new_tokens=4, metric="flexible-extract", stop=["\n"])})
  names = [jsonl.register(JsonlTask(name=n, splits={"test": str(path)},
                                    **{"prompt": "{p}", **s})) for n, s in specs.items()]
  datas = task_splits.load_split(names, "test", None, transformer.VOCAB)
  return dec, params, names, datas


def _check_scores(names, datas, scores, details):
  for name, d, score in zip(names, datas, scores):
    task, _ = task_splits._HOST[(d.name, d.split, d.examples, d.vocab_key)]
    how = jsonl_scoring(task, d)
    key = samples.score_key(task, d.kind, how.metric if d.kind == "generate"
                            else how.score_metric)
    metrics, logged = details[name]
    metric, filt = key.split(",")
    per_item = [s[metric] for s in logged if s["filter"] == filt]
    assert len(per_item) == len(PROMPTS), (name, key)
    assert 100 * np.mean(per_item) == pytest.approx(float(score), abs=1e-4), name
    assert 100 * metrics[key] == pytest.approx(float(score), abs=1e-4), name


def jsonl_scoring(task, d):
  from recycle_jax.evaluation import scoring
  return scoring.of(task, d.kind == "choice")


@pytest.mark.slow  # compiles the scorer and the log-likelihood programs of 6 tasks
def test_each_kinds_records_average_to_its_score(setup):
  dec, params, names, datas = setup
  score = jax.jit(scorers.make_scorer(dec))
  scores, details = harness.evaluate(score, params, datas, samples=True, decoder=dec)
  assert set(details) == set(names)
  assert 0 < scores[names.index("s_generate")] < 100  # the metrics are not all trivial
  assert 0 < scores[names.index("s_exact_eos")] < 100
  _check_scores(names, datas, scores, details)
  mc = details["s_choice_acc"][1]
  first = mc[0]
  assert list(first)[:len(LM_EVAL_KEYS)] == LM_EVAL_KEYS
  assert first["metrics"] == ["acc", "acc_norm", "acc_bytes", "acc_mean_token"]
  assert first["arguments"] == [("Q: cat", " yes"), ("Q: cat", " no")]
  assert first["target"] == 0 and first["doc"]["choices"] == ["yes", "no"]
  assert [len(s["filtered_resps"]) for s in mc[:3]] == [2, 3, 4]  # one (ll, is_greedy) each
  ll, greedy = mc[0]["filtered_resps"][0]
  assert ll < 0 and isinstance(greedy, bool)
  # the same choice examples share their log-likelihoods whatever metric a task reports
  assert details["s_choice_acc_norm"][1][2]["filtered_resps"] == mc[2]["filtered_resps"]
  ex = details["s_exact"][1][0]
  assert ex["metrics"] == ["perplexity", "acc"] and ex["perplexity"] == ex["resps"][0][0][0]
  gen = details["s_generate"][1]
  assert gen[0]["arguments"][0][1] == {"until": [], "max_gen_toks": 8, "do_sample": False}
  assert gen[1]["exact_match"] == 0.0 and gen[1]["target"].endswith(" zq")
  num = details["s_numeric"][1]
  assert {s["filter"] for s in num} == {"strict-match", "flexible-extract"}
  assert all(s["metrics"] == ["exact_match"] for s in num)
  assert {s["filtered_resps"][0] for s in num} == {"[invalid]"}  # the model writes no digit


@pytest.mark.slow  # the same programs again, then the records over the 8-device mesh
def test_records_over_the_mesh(setup):
  """Examples split over the mesh's 'data' axis (generation rows padded): the same
  records, still averaging to the scores."""
  dec, params, names, datas = setup
  score = jax.jit(scorers.make_scorer(dec))
  scores, details = harness.evaluate(score, params, datas, samples=True, decoder=dec)
  mesh = partitioning.make_mesh()
  placed = task_data.place(datas, mesh)
  on_mesh = jax.device_put(params, partitioning.replicated(mesh))
  scores2, details2 = harness.evaluate(score, on_mesh, placed, samples=True, decoder=dec)
  np.testing.assert_allclose(scores2, scores, atol=1e-4)
  _check_scores(names, placed, scores2, details2)
  for n in names:
    a, b = details[n][1], details2[n][1]
    assert [s["filtered_resps"] for s in a if isinstance(s["filtered_resps"][0], str)] == \
        [s["filtered_resps"] for s in b if isinstance(s["filtered_resps"][0], str)], n
    for x, y in zip(a, b):
      assert {k: x[k] for k in x["metrics"]} == {k: y[k] for k in y["metrics"]}, n


@pytest.mark.slow  # the scorer and log-likelihood programs of 3 tasks
def test_written_as_lm_eval_writes_them(setup, tmp_path):
  """samples_TASK.jsonl byte for byte as lm-eval's EvaluationTracker writes the records."""
  tracker_mod = pytest.importorskip("lm_eval.loggers.evaluation_tracker")
  dec, params, names, datas = setup
  _, details = harness.evaluate(jax.jit(scorers.make_scorer(dec)), params, datas,
                                samples=True, decoder=dec)
  logged = {n: details[n][1] for n in ("s_choice_acc", "s_exact", "s_numeric")}
  harness.write_samples(str(tmp_path / "ours"), logged)
  tracker = tracker_mod.EvaluationTracker(output_path=str(tmp_path / "ref"))
  tracker.general_config_tracker.model_name_sanitized = "m"
  tracker.date_id = "d"
  for n, records in logged.items():
    tracker.save_results_samples(n, copy.deepcopy(records))
    ours = (tmp_path / "ours" / f"samples_{n}.jsonl").read_text(encoding="utf-8")
    assert ours == (tmp_path / "ref" / "m" / f"samples_{n}_d.jsonl").read_text(
        encoding="utf-8"), n
    assert len(ours.splitlines()) == len(records)


def test_record_hashes_as_lm_eval():
  utils = pytest.importorskip("lm_eval.utils")
  doc = {"q": "héllo", "n": np.int64(3), "s": {1}}
  r = samples.record(0, doc, 2, [("ctx", " a")], [[(-1.0, False)]], [(-1.0, False)],
                     "none", {"acc": 1.0})
  assert r["doc_hash"] == utils.hash_string(json.dumps(
      doc, indent=2, default=utils.handle_non_serializable, ensure_ascii=False))
  assert r["prompt_hash"] == utils.hash_string("ctx")
  assert r["target_hash"] == utils.hash_string("2")
  nested = [[(-1.5, True)], ["x", 3]]
  assert samples.as_strings(nested) == utils.sanitize_list(nested)


def test_instruction_level_lists_per_item():
  """IFEval's instruction-level metrics are lists per document, as lm-eval logs them; their
  mean over every instruction is the verifier's score."""
  fn = VERIFIERS["ifeval"]
  targets = [{"instruction_id_list": ["punctuation:no_comma", "detectable_format:title"],
              "kwargs": [{}, {}], "prompt": "p"},
             {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "prompt": "q"}]
  preds = ["no commas here", "a, b"]
  items = samples._per_item(fn, targets, preds)
  assert items[0]["inst_level_strict_acc"] == [1.0, 0.0]
  assert items[1]["inst_level_strict_acc"] == 0.0
  records = [samples.record(i, {}, "", [("p", {})], [[p]], [p], "none", m)
             for i, (p, m) in enumerate(zip(preds, items))]
  agg = samples.aggregate(records)
  want = fn(targets, preds)
  for k, v in want.items():
    assert 100 * agg[f"{k},none"] == pytest.approx(v), k


def _rows():
  """Three choice examples in seqio's form (bytes, token ids beside their text)."""
  return [{"inputs_pretokenized": b"Q: 100 degrees?", "inputs": np.array([5, 6]),
           "choices": np.array([b"0 degrees", b"100 degrees", b"no"]), "label": 1,
           "targets_pretokenized": b"100 degrees"},
          {"inputs_pretokenized": b"Q: tie", "inputs": np.array([7]),
           "choices": np.array([b"ab", b"cd"]), "label": 1, "targets_pretokenized": b"cd"},
          {"inputs_pretokenized": b"Q: x", "inputs": np.array([8]),
           "choices": np.array([b"x", b"xxxx"]), "label": 0, "targets_pretokenized": b"x"}]


def test_choice_metrics_as_lm_eval_computes_them():
  """acc (sum), acc_norm (per character), acc_bytes, acc_mean_token (per token); ties to
  the first choice; the document without token ids."""
  from recycle_jax.evaluation import scoring
  summed = np.array([[-7.0, -8.0, -7.5], [-3.0, -3.0, -np.inf], [-2.0, -4.0, -np.inf]],
                    np.float32)
  greedy = np.zeros((3, 3), bool)
  count = np.array([[2, 4, 1], [1, 1, 0], [1, 1, 0]], np.int32)
  logged = samples._choice(_rows(), scoring.Scoring("choice"), summed, greedy, count)
  got = [{m: s[m] for m in s["metrics"]} for s in logged]
  # "100 degrees" (11 chars, 4 tokens) loses on the sum, wins per character and per token
  assert got[0] == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0, "acc_mean_token": 1.0}
  assert got[1] == dict.fromkeys(got[1], 0.0)  # a tie goes to the first choice
  assert got[2] == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 0.0, "acc_mean_token": 1.0}
  assert logged[0]["doc"] == {"inputs_pretokenized": "Q: 100 degrees?",
                              "choices": ["0 degrees", "100 degrees", "no"], "label": 1,
                              "targets_pretokenized": "100 degrees"}
  assert logged[0]["arguments"][1] == ("Q: 100 degrees?", " 100 degrees")
  assert samples.aggregate(logged)["acc_norm,none"] == pytest.approx(1 / 3)


def test_writer_as_lm_eval_tracker(tmp_path):
  """samples_TASK.jsonl byte for byte as lm-eval's EvaluationTracker writes the same
  records (tuples, bools, floats, numpy scalars, non-ASCII text)."""
  tracker_mod = pytest.importorskip("lm_eval.loggers.evaluation_tracker")
  from recycle_jax.evaluation import scoring
  summed = np.array([[-6.5, -8.25, -7.0], [-3.0, -3.0, -np.inf], [-2.0, -4.0, -np.inf]],
                    np.float32)
  logged = samples._choice(_rows(), scoring.Scoring("choice"), summed,
                           np.eye(3, dtype=bool), np.ones((3, 3), np.int32))
  logged.append(samples.record(3, {"q": "héllo", "n": np.int64(3)}, "72",
                               [("Q: é?", {"until": ["\n"], "max_gen_toks": 8,
                                           "do_sample": False})],
                               [["#### 72 ok"]], ["72"], "strict-match",
                               {"exact_match": np.float64(1.0)}))
  samples.write(str(tmp_path / "ours"), {"t": logged})
  tracker = tracker_mod.EvaluationTracker(output_path=str(tmp_path / "ref"))
  tracker.general_config_tracker.model_name_sanitized = "m"
  tracker.date_id = "d"
  tracker.save_results_samples("t", copy.deepcopy(logged))
  ours = (tmp_path / "ours" / "samples_t.jsonl").read_text(encoding="utf-8")
  assert ours == (tmp_path / "ref" / "m" / "samples_t_d.jsonl").read_text(encoding="utf-8")
  assert len(ours.splitlines()) == 4
