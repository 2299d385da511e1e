"""Verifiers accept right answers and reject wrong ones (the code sandbox itself:
test_sandbox.py)."""
import pytest

from recycle_jax.evaluation import verifiers
from recycle_jax.runtime.errors import UserError
from recycle_jax.evaluation.verifiers import ifeval, numeric

_IF = {"instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
       "kwargs": [{}, {}]}
# Per verifier: targets, right predictions, wrong predictions (one each per target).
CASES = {
    "exact_match": (["The Fox.", ["b", "cat"]], ["The Fox.", "cat"], ["fox", "Cat"]),
    "exact_match_squad": (["The Fox.", ["b", "cat"]], ["fox", "Cat"], ["dog", "a"]),
    "regex_match": ([r"\d+ apples", r"(yes|no)"], ["12 apples", " no "], ["apples", "maybe"]),
    "numeric": (["#### 1,234", "-3", "Natalia sold 72 clips.\n#### 72"],
                ["#### 1234.", "#### -3", "#### 72\n#### 73"],
                ["#### 1,235", "it is -3", "#### 27 then 72"]),
    "code_tests": ([{"prefix": "def f(x):\n", "tests": "assert f(2) == 4"}, "assert g() == 1"],
                   ["  return x * 2", "def g(): return 1"],
                   ["  return x + 3", "def g(): return 2"]),
    "code_output": (["6", {"prefix": "x = 3\n", "stdout": "9"}],
                    ["print(1 + 2 + 3)", "print(x * x)"], ["print(7)", "print(x)"]),
    "output_prediction": (["a = 'fox'\nprint(a[::-1])", {"program": "print('ab' * 2)"}],
                          ["xof", "abab\n"], ["fox", "ab"]),
    "ifeval": ([_IF], ["all lower case here"], ["Upper, and a comma"]),
}


def test_every_verifier_has_cases():
  assert set(CASES) == set(verifiers.REGISTRY), "add right/wrong cases for a new verifier"


@pytest.mark.parametrize("name", sorted(verifiers.REGISTRY))
def test_verifier_accepts_right_rejects_wrong(name):
  v = verifiers.REGISTRY[name]
  targets, right, wrong = CASES[name]
  good, bad = v(targets, right), v(targets, wrong)
  assert list(good) == list(v.hits(targets, right))  # seqio metric: {name: percentage}
  assert next(iter(good.values())) == 100.0, good
  assert next(iter(bad.values())) == 0.0, bad
  assert v.primary(targets, right).tolist() == [1.0] * len(targets)
  assert v.__name__ == name
  assert tuple(good) == v.metrics  # the metrics a task can name as its score


def test_unknown_verifier_is_refused():
  with pytest.raises(UserError, match="unknown verifier 'nope'.*numeric"):
    verifiers.get("nope")


@pytest.mark.parametrize("text,strict,flexible", [
    ("The answer is 72.", "[invalid]", "72."), ("#### 1,234", "1,234", "1,234"),
    ("so $18.00 total", "[invalid]", "$18.00"), ("x #### 7 and then 9", "7", "9"),
    ("it fell to -5 then +3.5", "[invalid]", "3.5"), ("nothing here", "[invalid]", "[invalid]")])
def test_numeric_filters(text, strict, flexible):
  assert (numeric.strict_match(text), numeric.flexible_extract(text)) == (strict, flexible)


def test_verifier_options_are_bound_and_checked():
  v = verifiers.get("exact_match").with_options({"ignore_case": True})
  assert v(["Lion"], ["lion"]) == {"exact_match": 100.0}
  with pytest.raises(UserError, match="takes no option ignore_articles"):
    verifiers.get("exact_match").with_options({"ignore_articles": True})
  with pytest.raises(UserError, match="has no metric 'acc'.*strict-match, flexible-extract"):
    verifiers.get("numeric").check_metric("acc", "JsonlTask.metric")


def test_regex_match_refuses_an_invalid_pattern():
  with pytest.raises(UserError, match=r"invalid regular expression '\('"):
    verifiers.get("regex_match")(["("], ["x"])


# ----------------------------------------------------------------------------- IFEval
# (instruction, kwargs, a response that follows it, one that does not)
IFEVAL = [
    ("keywords:existence", {"keywords": ["merge", "pool"]}, "We merge the pool.", "We merge."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "cat and Cat", "one cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "badge is fine", "it is bad"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "a z here", "zz top"),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Smith came. He sat. It rained 2.5 cm!", "Mr. Smith came. He sat."),
    ("length_constraints:number_words", {"num_words": 4, "relation": "less than"},
     "three short words", "four words are too many"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\ntwo",
     "one\n***\n***\ntwo"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\n\"Then, more.", "First part.\n\nAnd more."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], at [address]", "Dear [name]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye",
     "Hi. PS bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b", "* a\n* b\n* c"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", "*one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\na\nSection 2\nb", "Section 1\nonly"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<My Poem>>\nroses", "My Poem\nroses"),
    ("combination:two_responses", {}, "first******second", "same******same"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi!"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?", "Any other questions? Done."),
    ("startend:quotation", {}, '"quoted"', 'not "quoted"'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "VERY LOUD words", "only ONE"),
    ("change_case:english_capital", {}, "THIS IS ALL CAPITAL ENGLISH TEXT ABOUT THE WEATHER.",
     "Not caps"),
    ("change_case:english_lowercase", {}, "this is all lowercase english text about the weather.",
     "c'est une phrase en français, écrite tout en minuscules, vraiment."),
    ("language:response_language", {"language": "de"},
     "Das ist ein schöner Tag, und wir gehen heute spazieren.", "This is an English sentence."),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
]


def test_ifeval_covers_its_registry():
  assert {case[0] for case in IFEVAL} == set(ifeval.INSTRUCTIONS)


@pytest.mark.parametrize("instruction,kwargs,follows,breaks", IFEVAL,
                         ids=[c[0] for c in IFEVAL])
def test_ifeval_instruction(instruction, kwargs, follows, breaks):
  target = [{"instruction_id_list": [instruction], "kwargs": [kwargs], "prompt": "Say hi."}]
  v = verifiers.get("ifeval")
  assert v(target, [follows])["prompt_level_strict_acc"] == 100.0
  assert v(target, [breaks])["prompt_level_strict_acc"] == 0.0


def test_ifeval_loose_and_instruction_level():
  target = {"instruction_id_list": ["change_case:english_lowercase", "startend:quotation"],
            "kwargs": [{}, {}]}
  # A preamble line breaks both strictly; loose drops the first line and follows both.
  out = verifiers.get("ifeval")([target, target], ['Sure:\n"all lower"', '"ALL UPPER"'])
  assert out["prompt_level_strict_acc"] == 0.0
  assert out["prompt_level_loose_acc"] == 50.0
  assert out["inst_level_strict_acc"] == 25.0  # 1 of 4 instructions: the second quotation
  assert out["inst_level_loose_acc"] == 75.0
  # Asterisks stripped: emphasis does not break lowercase-only or a title check loosely.
  assert ifeval.loose_variants("a\n*b*\nc")[1] == "a\nb\nc"
  assert verifiers.get("ifeval")([target], ["   "])["prompt_level_loose_acc"] == 0.0


def test_ifeval_refuses_unknown_instruction():
  with pytest.raises(UserError, match="unsupported IFEval instruction 'language:nope'"):
    verifiers.get("ifeval")([{"instruction_id_list": ["language:nope"],
                              "kwargs": [{"language": "fr"}]}], ["bonjour"])


def test_sentence_and_word_splitting():
  assert ifeval.split_sentences("Mr. Smith paid $3.50. Then he left! Why? e.g. this.") == [
      "Mr. Smith paid $3.50.", "Then he left!", "Why?", "e.g.", "this."]  # as nltk's Punkt
  assert ifeval.count_words("It's a well-known fact, isn't it?") == 9
