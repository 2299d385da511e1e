"""Hostile documents and lying files: every reader bounds what it parses and refuses, by
name, what would be read silently wrong (the fault suite applies the same damage to every
file and command; these pin the readers' behaviour itself)."""
import json
import math
import os
import time

import numpy as np
import pytest

from recycle_jax.checkpoint_io import mergekit_config, safetensors_io
from recycle_jax.evaluation import vocabularies
from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import UserError

DEEP = 100_000


@pytest.mark.parametrize("text, words", [
    ("[" * DEEP + "]" * DEEP, "nested deeper than"),
    ('{"a": ' + "[" * (validation.MAX_DEPTH + 1) + "]" * (validation.MAX_DEPTH + 1) + "}",
     "nested deeper than"),
    ('{"n": 1' + "0" * 400 + "}", "out of float range"),
    ('{"n": -1' + "0" * 400 + ".5}", "out of float range"),
    ('{"n": 1e400}', "out of float range"),
    ('{"s": "\\ud800"}', "lone surrogate"),
    ('{"\\udfff": 1}', "lone surrogate"),
])
def test_json_beyond_the_bounds_is_refused_by_name(text, words):
  with pytest.raises(validation.DocumentError, match=words):
    validation.parse_json(text)


def test_json_within_the_bounds_reads_as_json_defines_it():
  doc = {"s": "a\u2028b\u0085c\U0001f600", "n": 1.5e308, "i": 10**300, "d": [[[[1]]]]}
  assert validation.parse_json(json.dumps(doc)) == doc
  assert validation.parse_json(json.dumps(doc, ensure_ascii=False)) == doc
  assert validation.parse_json('"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair
  with pytest.raises(ValueError, match="NaN"):
    validation.parse_json('{"x": NaN}')


def test_jsonl_lines_split_at_newline_only():
  rows = [{"q": "a\u2028b"}, {"q": "c\u0085d\u2029e\x1cf"}]
  text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
  assert len(text.splitlines()) > 3  # what str.splitlines would have cut
  lines = [line for line in validation.split_lines(text) if line]
  assert [validation.parse_json(line) for line in lines] == rows


def _alias_bomb(levels: int) -> str:
  out = 'a0: &a0 ["x","x","x","x","x","x","x","x","x"]\n'
  for i in range(1, levels):
    out += f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n"
  return out


def test_yaml_alias_bomb_deep_nesting_and_huge_numbers_are_refused_quickly():
  t0 = time.monotonic()
  with pytest.raises(validation.DocumentError, match="expands to more than"):
    validation.parse_yaml(_alias_bomb(9))  # 387 M nodes expanded
  with pytest.raises(validation.DocumentError, match="nested deeper"):
    validation.parse_yaml("a: " + "[" * DEEP + "]" * DEEP)
  with pytest.raises(validation.DocumentError, match="out of float range"):
    validation.parse_yaml("w: " + "9" * 400)
  assert time.monotonic() - t0 < 20
  # aliases within the bound are YAML as usual
  assert validation.parse_yaml(_alias_bomb(3))["a2"] == [[["x"] * 9] * 9] * 9
  assert validation.parse_yaml("a: &x {b: 1}\nc: *x\n") == {"a": {"b": 1}, "c": {"b": 1}}


def test_a_mergekit_alias_bomb_is_one_line_naming_the_config(tmp_path):
  p = tmp_path / "merge.yml"
  p.write_text(_alias_bomb(9) + "merge_method: linear\n")
  with pytest.raises(UserError, match="expands to more than") as e:
    mergekit_config.load(str(p))
  assert str(p) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- safetensors

def _safetensors(path, tensors: dict, edit=None) -> str:
  """A safetensors file written by our writer, its header then edited by `edit`."""
  folder = os.path.dirname(path)
  w = safetensors_io.Writer(folder, [(k, v.dtype, v.shape) for k, v in tensors.items()])
  for k, v in tensors.items():
    w.write(k, v)
  w.close(fsync=False)
  data = open(os.path.join(folder, safetensors_io.WEIGHTS), "rb").read()
  if edit is not None:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    open(os.path.join(folder, safetensors_io.WEIGHTS), "wb").write(data)
  return os.path.join(folder, safetensors_io.WEIGHTS)


TENSORS = {"embed.weight": np.full((4, 2), 0.04, np.float32),
           "norm.weight": np.ones(8, np.float32), "position_ids": np.arange(4, dtype=np.int64)}


def _lie(h):
  h["embed.weight"]["dtype"] = "I32"


def _overlap(h):
  h["norm.weight"]["data_offsets"] = list(h["embed.weight"]["data_offsets"])


def _past_the_end(h):
  a, b = h["position_ids"]["data_offsets"]
  h["position_ids"]["data_offsets"] = [a + 64, b + 64]


@pytest.mark.parametrize("edit, words", [
    (_lie, "'embed.weight' is declared I32, not a floating type"),
    (_overlap, "share bytes"),
    (_past_the_end, "truncated"),
])
def test_lying_safetensors_headers_are_refused_by_every_reader(tmp_path, edit, words):
  path = _safetensors(str(tmp_path / "x"), TENSORS, edit)
  for read in (validation.check_safetensors, safetensors_io.read_header):
    with pytest.raises(UserError, match=words) as e:
      read(path)
    assert path in str(e.value)


def test_an_honest_header_reads_with_integer_buffers(tmp_path):
  path = _safetensors(str(tmp_path / "x"), TENSORS)
  infos = safetensors_io.read_header(path)
  assert infos["position_ids"].dtype == np.int64
  np.testing.assert_array_equal(safetensors_io.Reader().read(infos["embed.weight"]),
                                TENSORS["embed.weight"])


# ----------------------------------------------------------------------------- mergekit

@pytest.mark.parametrize("method, name, value", [
    ("ties", "density", -0.5), ("dare_linear", "density", -0.5), ("dare_ties", "density", 7),
    ("della", "epsilon", -0.1), ("breadcrumbs", "gamma", -0.1), ("karcher", "max_iter", -1),
    ("slerp", "t", 1e300), ("karcher", "tol", 0), ("multislerp", "eps", -1),
])
def test_mergekit_parameters_out_of_their_range_are_refused(method, name, value):
  p = mergekit_config.REGISTRY.get(method).param(name)
  with pytest.raises(UserError, match=f"parameter '{name}' is .*outside"):
    mergekit_config._check_setting(p, value, "merge.yml")  # noqa: SLF001
  with pytest.raises(UserError, match="outside"):  # in a gradient too
    mergekit_config._check_setting(p, [p.default if p.default is not mergekit_config.REQUIRED
                                       else 0.5, value], "merge.yml")  # noqa: SLF001
  lo, hi, _ = p.valid
  good = p.default if isinstance(p.default, (int, float)) else (lo + hi) / 2
  mergekit_config._check_setting(p, good, "merge.yml")  # noqa: SLF001


# ----------------------------------------------------------------------------- chat templates

def _render(template: str) -> str:
  return vocabularies._render(template, [{"role": "user", "content": "hi"}])  # noqa: SLF001


def test_a_chat_template_that_loops_ends_at_the_time_bound(monkeypatch):
  monkeypatch.setattr(vocabularies, "CHAT_TEMPLATE_SECONDS", 0.5)
  t0 = time.monotonic()
  with pytest.raises(UserError, match="did not finish within 0.5 s"):
    _render("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}")
  assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("template, words", [
    ("{{ 'x' * 10000000000 }}", "builds more than"),
    ("{{ [1] * 10000000000 }}", "builds more than"),
    ("{{ 2 ** 100000 }}", "too large"),
    ("{{ raise_exception('no system role') }}", "chat template error: no system role"),
    ("{{ 1 // 0 }}", "cannot be rendered: ZeroDivisionError"),
    ("{{ ''.__class__.__mro__ }}", "cannot be rendered"),
])
def test_a_hostile_chat_template_is_one_line(template, words):
  with pytest.raises(UserError, match=words) as e:
    _render(template)
  assert "\n" not in str(e.value)


def test_ordinary_chat_templates_render():
  t = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
       "{% if add_generation_prompt %}<|assistant|>{% endif %}{{ '-' * 3 }}")
  assert _render(t) == "<|user|>hi<|assistant|>---"
  assert math.isclose(float(_render("{{ 2 ** 10 }}")), 1024)
