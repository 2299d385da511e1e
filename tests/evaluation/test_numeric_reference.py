"""The numeric verifier against lm-eval's gsm8k filters and metric, item for item, and
exact_match against lm-eval's exact_match with its options."""
import pytest

from recycle_jax.evaluation.verifiers import numeric, text
from recycle_jax.runtime.errors import UserError

TARGET = "She sold 48 + 24 = 72 clips.\n#### 72"
RESPONSES = [
  "#### 72", "The answer is 72.\n#### 72", "#### 72.00", "#### 072", "#### 07", "####72",
  "#### $72", "#### -72", "#### 72.", "#### 7,2", "#### 72\n#### 73", "#### 73\n#### 72",
  "72", "The answer is 72.", "The answer is 72", "$72", "72 dollars", "It is 7.2 or 72",
  "72 or 73", "seventy-two", "", "#### ", "#### seventy", "#### 72 apples", "#### 1,072",
  "I think 72.0", "72.", ".5", "#### .5", "#### -", "Answer: -72", "Answer: 72!",
  "So 48+24=72", "72\n\nQuestion: next", "#### 72\nThe answer is 71", "#### 72,",
  "#### 72$", "The total is $72.00.", "We get 72, then 72", "1. first 2. second 72",
  "#### 72.0\n", "x = 72;",
]
assert len(RESPONSES) == 42, len(RESPONSES)
GSM8K_OPTIONS = dict(ignore_case=True, ignore_punctuation=False,
                     regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"])


def _lm_eval(response: str, target: str, strict: bool) -> float:
  from lm_eval.api.metrics import exact_match_hf_evaluate
  from lm_eval.filters.extraction import RegexFilter
  from lm_eval.filters.selection import TakeFirstFilter
  f = (RegexFilter(regex_pattern="#### (\\-?[0-9\\.\\,]+)") if strict else
       RegexFilter(regex_pattern="(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1))
  out = list(TakeFirstFilter().apply(f.apply([[response]], [{}]), [{}]))[0]
  return float(exact_match_hf_evaluate(predictions=[out], references=[target],
                                       **GSM8K_OPTIONS)["exact_match"])


def test_both_filters_agree_with_lm_eval_on_42_strings():
  pytest.importorskip("lm_eval")
  hits = numeric.numeric_hits([TARGET] * len(RESPONSES), RESPONSES)
  strict = [_lm_eval(r, TARGET, True) for r in RESPONSES]
  flexible = [_lm_eval(r, TARGET, False) for r in RESPONSES]
  assert hits["strict-match"] == strict
  assert hits["flexible-extract"] == flexible
  assert 0 < sum(strict) < sum(flexible) < len(RESPONSES)  # the cases tell them apart


@pytest.mark.parametrize("response,strict,flexible", [
    ("#### 72", 1, 1), ("#### 72.00", 0, 0), ("####72", 0, 1), ("#### $72", 0, 1),
    ("#### 72\n#### 73", 1, 0), ("The answer is 72.", 0, 1), ("seventy-two", 0, 0)])
def test_named_cases(response, strict, flexible):
  hits = numeric.numeric_hits([TARGET], [response])
  assert (hits["strict-match"][0], hits["flexible-extract"][0]) == (strict, flexible)


@pytest.mark.parametrize("options", [
    {}, {"ignore_case": True}, {"ignore_punctuation": True},
    {"regexes_to_ignore": ["^the ", "\\s+$"]},
    {"ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": ["\\d"]}])
def test_exact_match_agrees_with_lm_eval(options):
  pytest.importorskip("lm_eval")
  from lm_eval.api.metrics import exact_match_hf_evaluate
  pairs = [("The lion", "Lion"), ("lion", "Lion"), ("Lion.", "Lion"), ("the Lion ", "Lion"),
           ("Lion 2", "Lion 3"), ("a-b", "ab"), ("Lion", "Lion")]
  ours = text.exact_match_hits([t for _, t in pairs], [p for p, _ in pairs], **options)
  theirs = [float(exact_match_hf_evaluate(predictions=[p], references=[t], **options)
                  ["exact_match"]) for p, t in pairs]
  assert ours["exact_match"] == theirs


def test_article_stripping_only_by_its_own_name():
  assert text.exact_match_hits(["Lion"], ["The lion"])["exact_match"] == [0.0]
  assert text.exact_match_squad_hits(["Lion"], ["The lion"])["exact_match_squad"] == [1.0]


def test_an_invalid_regex_to_ignore_is_refused():
  with pytest.raises(UserError, match="invalid regular expression"):
    text.exact_match_hits(["a"], ["a"], regexes_to_ignore=["("])
