"""lm-eval's tasks as a task source (`lm_eval:NAME`, tasks.harness) on a tiny Hugging Face
model built here: item for item the same as lm-eval's own `hf` model
(benchmarks/lm_eval_parity.py's comparison), the same through the population program
over the 8-device mesh, `eval --log_samples` in lm-eval's samples format, and bad input
refused in one line with nothing written."""
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from recycle_jax import cli, configurables, placed_pool
from recycle_jax.checkpoint_io import checkpoints, tokenizer_files
from recycle_jax.evaluation import scorers, task_data, task_splits, vocabularies
from recycle_jax.models import partitioning, transformer
from recycle_jax.search import population
from recycle_jax.tasks import harness

import hf_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "lm_eval_parity", os.path.join(ROOT, "benchmarks", "lm_eval_parity.py"))
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

# loglikelihood (multiple choice), loglikelihood_rolling, generate_until with both GSM8K
# filters: one task of each request type lm-eval sends.
TASKS = ("parity_mc", "parity_rolling", "parity_gsm")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_hf"))
  tok = hf_fixtures.train_bpe(folder)
  hf_fixtures.tiny_llama(folder, len(tok), max_positions=1024)
  return folder


@pytest.fixture(scope="module")
def yamls(tmp_path_factory):
  return parity.write_tasks(str(tmp_path_factory.mktemp("lm_eval_tasks")), items=4,
                            max_gen_toks=6)


@pytest.fixture(autouse=True)
def _options():
  yield
  harness.configure(include_path=(), num_fewshot=None, apply_chat_template=False,
                    fewshot_as_multiturn=False)


def _model(folder):
  meta = checkpoints.read_metadata(folder)
  cfg = placed_pool.model_config_from(meta, folder)
  vocab = vocabularies.for_evaluation(tokenizer_files.of_checkpoint(folder, meta.custom),
                                      cfg.vocab_size, folder)
  return cfg, vocab, checkpoints.restore(folder, meta.abstract)


def test_item_for_item_as_lm_eval_hf(tiny, yamls):
  """Every document's every metric (and every generated text) as lm-eval's hf model
  gives it, except log-likelihood ties within 1e-4 (listed, none expected here)."""
  ref, ref_metrics, _ = parity.run_lm_eval(tiny, yamls, TASKS, batch_size=4)
  ours, our_metrics, _, _ = parity.run_recycle_jax(tiny, yamls, TASKS, repeat=False)
  rows = parity.compare(ref, ours)
  assert {r["task"] for r in rows} == set(TASKS)
  assert {r["metric"] for r in rows} >= {"acc", "acc_norm", "word_perplexity",
                                         "exact_match (strict-match)",
                                         "exact_match (flexible-extract)", "generated text"}
  for r in rows:
    assert r["items"] == 4 and not r["other"], r
    assert r["agree"] + len(r["ties"]) == 4
    assert r["max_dll"] < 1e-3, r
  for t in TASKS:  # the aggregates too, under lm-eval's names
    for key, value in our_metrics[t].items():
      assert value == pytest.approx(ref_metrics[t][key], rel=1e-4), (t, key)


@pytest.mark.slow  # compiles the population program over the 8-device mesh
def test_population_program_over_the_mesh(tiny, yamls):
  """An lm-eval split placed over the 8 devices' 'data' axis and scored by the population
  program (the search's) gives each candidate the fitness `eval` gives it alone."""
  cfg, vocab, params = _model(tiny)
  harness.configure(include_path=(yamls,), context_length=cfg.max_position_embeddings)
  datas = task_splits.load_split(["lm_eval:parity_mc", "lm_eval:parity_gsm@exact_match/"
                                  "flexible-extract"], "test", None, vocab)
  dec = transformer.Decoder(cfg)
  score = jax.jit(configurables.make_scorer(dec))
  alone, details = harness.evaluate(score, params, datas)
  assert alone[0] == pytest.approx(100 * details["lm_eval:parity_mc"][0]["acc,none"])
  assert alone[1] == pytest.approx(
      100 * details[datas[1].name][0]["exact_match,flexible-extract"])
  mesh = partitioning.make_mesh()
  placed = task_data.place(datas, mesh)
  other = jax.tree.map(lambda x: -x, params)
  pool = jax.device_put((params, other), partitioning.replicated(mesh))
  fn = jax.jit(population.make_population_fn(scorers.make_scorer(dec), "map"))
  got, finite = population.pipelined(fn, np.array([[1, 0], [0, 1]], np.float32), pool,
                                     placed, width=2)
  assert finite.all()
  np.testing.assert_allclose(got[0], alone, atol=1e-4)
  np.testing.assert_allclose(got[1], harness.evaluate(score, other, datas)[0], atol=1e-4)


@pytest.mark.slow  # the CLI end to end: reads, compiles, writes
def test_eval_log_samples(tiny, yamls, tmp_path, capsys):
  out = tmp_path / "samples"
  assert cli.main(["eval", f"--checkpoint={tiny}", "--tasks=lm_eval:parity_mc,"
                   "lm_eval:parity_gsm", f"--include_path={yamls}",
                   f"--log_samples={out}", "--num_fewshot=1",
                   f"--output={tmp_path / 'scores.json'}"]) == 0
  assert sorted(os.listdir(out)) == ["samples_parity_gsm.jsonl", "samples_parity_mc.jsonl"]
  mc = [json.loads(l) for l in (out / "samples_parity_mc.jsonl").read_text().splitlines()]
  assert [s["doc_id"] for s in mc] == [0, 1, 2, 3]
  first = mc[0]
  assert first["doc"]["choices"] and first["metrics"] == ["acc", "acc_norm"]
  assert set(first["arguments"]) == {"gen_args_0", "gen_args_1", "gen_args_2", "gen_args_3"}
  assert first["arguments"]["gen_args_1"]["arg_1"] == " " + first["doc"]["choices"][1]
  assert len(first["filtered_resps"]) == 4 and first["acc"] in (0.0, 1.0)
  gsm = [json.loads(l) for l in (out / "samples_parity_gsm.jsonl").read_text().splitlines()]
  assert {s["filter"] for s in gsm} == {"strict-match", "flexible-extract"}
  assert gsm[0]["arguments"]["gen_args_0"]["arg_0"].count("Question:") == 2  # 1 shot
  scores = json.loads((tmp_path / "scores.json").read_text())
  assert set(scores["lm_eval"]["lm_eval:parity_gsm"]) == {
      "exact_match,strict-match", "exact_match,flexible-extract"}


def _refused(capsys, args, *words):
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), err
  for w in words:
    assert w in err[0], err[0]


def _yaml(folder, name, body):
  (folder / f"{name}.yaml").write_text(f"task: {name}\n" + body)


@pytest.mark.slow  # four CLI runs, each loading lm-eval's tasks
def test_bad_input_one_line_nothing_written(tiny, tmp_path, capsys):
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  data = tmp_path / "d.jsonl"
  data.write_text(json.dumps({"q": "x " * 600, "a": "y"}) + "\n")
  _yaml(tasks, "gone", "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{tmp_path / 'missing.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
  _yaml(tasks, "sampled", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{data}\ntest_split: test\noutput_type: generate_until\ndoc_to_text: 'hi'\n"
        "doc_to_target: '{{a}}'\ngeneration_kwargs:\n  do_sample: true\n"
        "  temperature: 0.7\n")
  _yaml(tasks, "long", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{data}\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{{{q}}}}'\n"
        "doc_to_target: ' {{a}}'\n")
  out = tmp_path / "out"
  base = ["eval", f"--checkpoint={tiny}", f"--include_path={tasks}",
          f"--log_samples={out}"]
  _refused(capsys, base + ["--tasks=lm_eval:gone"], "not available offline",
           "missing.jsonl", "data_files")
  _refused(capsys, base + ["--tasks=lm_eval:sampled"], "do_sample", "greedily")
  _refused(capsys, base + ["--tasks=lm_eval:long"], "more than the model's context (1024)")
  _refused(capsys, base + ["--tasks=lm_eval:sampled@nope"], "no metric nope",
           "exact_match/none")
  assert not out.exists()


@pytest.mark.slow  # reads lm-eval's index of its ~15k built-in tasks
def test_unknown_task_suggests_the_nearest(tiny, yamls, tmp_path, capsys):
  """eval, verify and search: a name lm-eval does not know is one line naming the nearest
  lm-eval tasks, exit 2, nothing written."""
  _refused(capsys, ["eval", f"--checkpoint={tiny}", f"--include_path={yamls}",
                    "--tasks=lm_eval:parity_mcq"], "lm-eval does not know", "parity_mc")
  _refused(capsys, ["eval", f"--checkpoint={tiny}", "--tasks=lm_eval:arc_eazy"],
           "arc_easy")
  preds = tmp_path / "p.jsonl"
  preds.write_text('{"doc_id": 0, "completion": "x"}\n')
  out = tmp_path / "verdicts.jsonl"
  _refused(capsys, ["verify", "--tasks=lm_eval:arc_eazy", f"--predictions={preds}",
                    f"--output={out}"], "lm-eval does not know task 'arc_eazy'", "arc_easy")
  _refused(capsys, ["verify", "--tasks=lm_eval:parity_mcq", f"--include_path={yamls}",
                    f"--predictions={preds}"], "lm-eval does not know", "parity_mc")
  _refused(capsys, ["verify", "--tasks=lm_eval:parity_mc", f"--include_path={yamls}",
                    f"--predictions={preds}"], "lm-eval's task 'parity_mc'", "--log_samples")
  shutil.copytree(tiny, tmp_path / "b")
  (tmp_path / "pool.json").write_text(json.dumps(
      {"checkpoints": [{"name": "a", "path": tiny}, {"name": "b", "path": "b"}]}))
  run = tmp_path / "run"
  _refused(capsys, ["search", f"--workdir={run}",
                    f"--gin_bindings=Experiment.pool={str(tmp_path / 'pool.json')!r}",
                    "--gin_bindings=Experiment.tasks=['lm_eval:arc_eazy']"],
           "lm-eval does not know task 'arc_eazy'", "arc_easy")
  assert not out.exists() and not run.exists()


@pytest.mark.slow  # a whole search (its programs compile) on a pool of two tiny HF models
def test_search_on_an_lm_eval_task(tmp_path, capsys):
  """`search` optimizes an lm-eval task's named metric (its validation split), reports its
  test split, and --log_samples writes the final merge's and the baselines' records."""
  tok = None
  for i in range(2):
    tok = hf_fixtures.train_bpe(tmp_path / f"m{i}")
    hf_fixtures.tiny_llama(tmp_path / f"m{i}", len(tok), seed=i, max_positions=1024)
  (tmp_path / "pool.json").write_text(json.dumps(
      {"checkpoints": [{"name": f"m{i}", "path": f"m{i}"} for i in range(2)]}))
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  docs = parity._mc_docs(6)
  for split, part in (("validation", docs[:3]), ("test", docs[3:])):
    (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
  _yaml(tasks, "mc2", "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tmp_path / 'validation.jsonl'}\n    test: {tmp_path / 'test.jsonl'}\n"
        "validation_split: validation\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: 'Question: {{question}}\\nAnswer:'\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  run = tmp_path / "run"
  assert cli.main(["search", f"--workdir={run}", f"--include_path={tasks}", "--log_samples",
                   f"--gin_bindings=Experiment.pool={str(tmp_path / 'pool.json')!r}",
                   "--gin_bindings=Experiment.tasks=['lm_eval:mc2@acc_norm']",
                   "--gin_bindings=Experiment.greedy_soup=False",
                   "--gin_bindings=SearchConfig.budget=8"]) == 0
  results = json.loads((run / "results.json").read_text())
  assert results["tasks"] == ["lm_eval:mc2@acc_norm"]
  for m in ("search", "uniform", "best_single"):
    assert (run / "samples" / m / "samples_mc2.jsonl").is_file(), m
    lines = (run / "samples" / m / "samples_mc2.jsonl").read_text().splitlines()
    assert [json.loads(l)["doc_id"] for l in lines] == [0, 1, 2]
