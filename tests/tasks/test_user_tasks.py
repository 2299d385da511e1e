"""Tasks from JSONL files (gin, no Python) and from user modules: registration, checks."""
import json
import textwrap

import gin
import pytest
import seqio

from recycle_jax.evaluation import task_splits
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.models import transformer
from recycle_jax.evaluation import scoring
from recycle_jax import configurables
from recycle_jax.tasks import jsonl
from recycle_jax.runtime.errors import UserError
from recycle_jax.tasks.jsonl import JsonlTask


def _write(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


@pytest.fixture
def qa(tmp_path):
  rows = [{"q": f"{a}+{b}", "a": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 1), (2, 2))]
  return {"train": _write(tmp_path / "train.jsonl", rows[:3]),
          "dev": _write(tmp_path / "dev.jsonl", rows[3:]),
          "test": _write(tmp_path / "test.jsonl", rows[:2])}


def _examples(name, split):
  return task_splits.split_examples(name, split, transformer.VOCAB)


def _qa_gin(qa, **bindings) -> str:
  """gin text declaring one JsonlTask over the `qa` files; bindings are gin values."""
  lines = ["jsonl_tasks.tasks = [@qa/JsonlTask()]",
           f"qa/JsonlTask.splits = {{'dev': {qa['dev']!r}, 'test': {qa['test']!r}}}"]
  return "\n".join(lines + [f"qa/JsonlTask.{k} = {v}" for k, v in bindings.items()]) + "\n"


def test_generate_task_with_fields_few_shot_and_verifier(qa):
  name = jsonl.register(JsonlTask(
      name="u_qa", splits=qa, prompt="Q: {question}\nA: ", fields={"question": "q"},
      target="{a}", verifier="numeric", few_shot=2, seed=3, max_new_tokens=8, stop=["\n"],
      metric="flexible-extract"))
  task = task_splits.bound_task(name, transformer.VOCAB)
  assert scoring.of(task, False) == scoring.Scoring("generate", 8, ("\n",),
                                                    metric="flexible-extract")
  [ex] = _examples(name, "dev")
  prompt = ex["inputs_pretokenized"].decode()
  assert prompt.endswith("Q: 2+2\nA: ") and prompt.count("Q: ") == 3  # 2 shots, then it
  assert prompt.split("\n\n")[0] in {"Q: 1+2\nA: 3", "Q: 3+4\nA: 7", "Q: 5+1\nA: 6"}
  assert prompt == _examples(name, "dev")[0]["inputs_pretokenized"].decode()  # fixed shots
  target = task.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True)
  assert target == "4"
  [metric] = task.metric_fns
  assert metric([target], ["4."]) == {"strict-match": 0.0, "flexible-extract": 100.0}
  assert scoring.score_texts(task, [ex], ["4.\nQ: more"]) == 100.0  # its named metric


def test_structured_verifier_target_and_choice_task(tmp_path):
  rows = [{"fn": "def f():\n", "tests": "assert f() == 1", "ok": "  return 1"}]
  name = jsonl.register(JsonlTask(
      name="u_code", splits={"dev": _write(tmp_path / "c.jsonl", rows)}, prompt="{fn}",
      target={"prefix": "{fn}", "tests": "{tests}"}, answer="{ok}", verifier="code_tests"))
  task = task_splits.bound_task(name, transformer.VOCAB)
  [ex] = _examples(name, "dev")
  target = task.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True)
  assert target == {"prefix": "def f():\n", "tests": "assert f() == 1"}
  assert task.metric_fns[0]([target], ["  return 1"])["pass@1"] == 100.0
  # choice: any number of choices per example; the label as an index or as the text
  rows = [{"p": "sky is", "c": ["blue", "green", "red"], "y": 0},
          {"p": "grass is", "c": ["red", "green"], "y": "green"}]
  name = jsonl.register(JsonlTask(
      name="u_choice", splits={"dev": _write(tmp_path / "m.jsonl", rows)}, prompt="{p} ",
      kind="choice", choices="c", label="y"))
  exs = _examples(name, "dev")
  assert [len(e["choices"]) for e in exs] == [3, 2] and [e["label"] for e in exs] == [0, 1]
  assert scoring.of(seqio.get_mixture_or_task(name), True).kind == "choice"


@pytest.mark.parametrize("change,message", [
    (dict(prompt="Q: {questoin}"), r"unknown field 'questoin': line 1 of .*\.jsonl does not"
                                   r" have it \(JsonlTask.prompt of task 'u_bad'\)"),
    (dict(kind="exact", verifier="numeric"),
     r"a verifier \('numeric'\) is given to kind 'exact', which does not generate"),
    (dict(kind="choice", verifier="numeric"), r"given to kind 'choice'"),
    (dict(verifier="numerc"), r"unknown verifier 'numerc'"),
    (dict(kind="rank"), r"unknown kind 'rank'"),
    (dict(splits={"dev": "/nonexistent/*.jsonl"}), r"no file matches '/nonexistent/\*.jsonl'"),
    (dict(few_shot=2, few_shot_split="dev"), r"few-shot examples need a split that is not"),
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer in \[1, 4096\]"),
    (dict(prompt="Q: {q"), r"invalid template"),
])
def test_bad_task_definitions_are_refused(qa, change, message):
  spec = dict(name="u_bad", splits=qa, prompt="Q: {q}", target="{a}")
  spec.update(change)
  with pytest.raises(UserError, match=message):
    jsonl.register(JsonlTask(**spec))
  assert "u_bad" not in seqio.TaskRegistry.names()


def test_bad_files_name_the_line(tmp_path):
  ok = {"q": "1", "a": "1"}
  cases = [([ok, {"q": "2"}], r"field 'a' is absent on line 2 of .*f.jsonl \(JsonlTask.target"),
           ([ok, "", '{"q": "3", "a": '], r"malformed JSON on line 3 of .*f.jsonl"),
           ([ok, "[1, 2]"], r"line 2 of .*f.jsonl is not a JSON object"),
           (['{"q": "1"}', ok], r"unknown field 'a': line 1 of .*f.jsonl does not have it"),
           (["[1]"], r"line 1 of .*f.jsonl is not a JSON object")]
  for i, (rows, message) in enumerate(cases):  # line 1 when registered, others when read
    (tmp_path / str(i)).mkdir()
    path = _write(tmp_path / str(i) / "f.jsonl", rows)
    with pytest.raises(UserError, match=message):
      jsonl.register(JsonlTask(name="u_bad", splits={"dev": path}, prompt="{q}",
                               target="{a}"))
      _examples("u_bad", "dev")


def test_max_examples_reads_only_the_lines_it_needs(tmp_path):
  rows = [{"q": str(i), "a": str(i)} for i in range(6)] + ['{"q": "broken']
  name = jsonl.register(JsonlTask(name="u_lazy", splits={"dev": _write(tmp_path / "d.jsonl",
                                                                        rows)},
                                  prompt="{q}", target="{a}", kind="exact"))
  got = task_splits.split_examples(name, "dev", transformer.VOCAB, limit=4)
  assert [e["inputs_pretokenized"].decode() for e in got] == ["0", "1", "2", "3"]
  with pytest.raises(UserError, match=r"malformed JSON on line 7 of .*d.jsonl"):
    _examples(name, "dev")  # all of it: every line is read, and checked


def test_gin_declares_tasks_without_python(qa, tmp_path):
  gin.clear_config()
  gin.parse_config(_qa_gin(qa, name="'u_gin'", prompt="'{q} = '", kind="'exact'",
                           target="'{a}'"))
  try:
    assert configurables.jsonl_tasks() == ["u_gin"]
  finally:
    gin.clear_config()
  assert [e["targets_pretokenized"] for e in _examples("u_gin", "test")] == [b"3", b"7"]
  assert scoring.of(seqio.get_mixture_or_task("u_gin"), False).kind == "exact"


def test_chat_template_needs_a_vocabulary_that_has_one(qa):
  jsonl.register(JsonlTask(name="u_chat", splits=qa, prompt="{q}", target="{a}",
                                chat_template=True))
  with pytest.raises(UserError, match="asks for a chat template, but its vocabulary "
                                      "ByteVocabulary has none"):
    _examples("u_chat", "dev")

  class ChatBytes(seqio.ByteVocabulary):
    def apply_chat_template(self, text):
      return f"<user>{text}</user><assistant>"
  jsonl.register(JsonlTask(name="u_chat", splits=qa, prompt="{q}", target="{a}",
                                chat_template=True))
  got = task_splits.split_examples("u_chat", "dev", ChatBytes())
  assert got[0]["inputs_pretokenized"] == b"<user>2+2</user><assistant>"


def test_task_modules_are_found_in_the_working_directory(tmp_path, monkeypatch):
  (tmp_path / "my_rj_tasks.py").write_text(textwrap.dedent("""
      import seqio
      import tensorflow as tf
      from recycle_jax import user_tasks
      from recycle_jax.models import transformer
      seqio.TaskRegistry.remove('u_module')
      seqio.TaskRegistry.add('u_module', source=seqio.FunctionDataSource(
          lambda split, shuffle_files=False, seed=None: tf.data.Dataset.from_tensor_slices(
              {'inputs': [split], 'targets': ['b']}), splits=['validation', 'test']),
          preprocessors=[seqio.preprocessors.tokenize],
          output_features={'inputs': seqio.Feature(transformer.VOCAB, add_eos=False),
                           'targets': seqio.Feature(transformer.VOCAB)})
      user_tasks.declare('u_module', user_tasks.Scoring('exact', splits=(('dev', 'validation'),)))
  """))
  monkeypatch.chdir(tmp_path)
  jsonl.import_modules(["my_rj_tasks"])
  assert "u_module" in seqio.TaskRegistry.names()
  # Its 'validation' split is what the search's 'dev' reads.
  [ex] = task_splits.split_examples("u_module", "dev", transformer.VOCAB)
  assert ex["inputs_pretokenized"] == b"validation"
  with pytest.raises(UserError, match=r"cannot import task module 'no_such_mod'.*--task_module"):
    jsonl.import_modules(["no_such_mod"])


def test_cli_eval_sees_user_tasks_from_gin_and_modules(micro_pool, qa, tmp_path, monkeypatch,
                                                        capsys):
  """`eval` on a task declared in a gin file (no Python), and on a task from --task_module
  found in the working directory; an unknown module is one error line."""
  from recycle_jax import cli
  ckpt = pool_manifest.read_manifest(micro_pool).entries[0].path
  gin_file = tmp_path / "qa.gin"
  gin_file.write_text(_qa_gin(qa, name="'u_cli_qa'", prompt="'Q: {q}\\nA: '",
                              target="'{a}'", verifier="'numeric'", max_new_tokens="4"))
  (tmp_path / "my_cli_tasks.py").write_text(textwrap.dedent(f"""
      from recycle_jax import user_tasks
      user_tasks.register(user_tasks.JsonlTask(name='u_cli_mod', splits={{'test': {qa['test']!r}}},
                                               prompt='{{q}} = ', kind='exact', target='{{a}}'))
  """))
  monkeypatch.chdir(tmp_path)
  assert cli.main(["eval", f"--checkpoint={ckpt}", "--tasks=u_cli_qa,u_cli_mod",
                   f"--gin_file={gin_file}", "--task_module=my_cli_tasks"]) == 0
  out = capsys.readouterr().out
  assert "u_cli_qa" in out and "u_cli_mod" in out
  assert cli.main(["eval", f"--checkpoint={ckpt}", "--tasks=u_cli_qa",
                   "--task_module=nope_tasks"]) == 2
  assert "error: cannot import task module 'nope_tasks'" in capsys.readouterr().err
