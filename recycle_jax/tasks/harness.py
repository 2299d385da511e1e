"""lm-evaluation-harness tasks as a task source: lm-eval builds the requests, recycle_jax
answers them on device for every candidate, lm-eval scores them on the host.

A task named `lm_eval:NAME` (optionally `lm_eval:NAME@METRIC` or `@METRIC/FILTER`, the
fitness; default lm-eval's first metric under its first filter) is one of lm-eval's
(0.4.13) built-in tasks or a YAML of the user's `include_path`. Its documents, few-shot
contexts, chat template and requests come from lm-eval's own Task (`fewshot_context`,
`construct_requests`), built once per split; the requests become device arrays:

  loglikelihood (and multiple_choice)  context and continuation tokenized as lm-eval's
          TemplateLM does (`_encode_pair`: trailing whitespace of the context moved into
          the continuation, encoded together and split at the context's length; an empty
          context is the prefix token), one packed row per document (the context once,
          each continuation a segment): summed log-prob and is_greedy of each continuation
          (`loglikelihood.packed_loglikelihood`).
  loglikelihood_rolling  lm-eval's disjoint rolling windows of the model's context, one
          packed row each; their log-probs summed per document.
  generate_until  greedy decoding (`decoding.generate`) of the task's `max_gen_toks`
          (lm-eval's default 256), stopping at EOS (and the checkpoint's
          generation_config EOS ids) or any `until` string; the text is cut at the first
          `until` string as lm-eval's hf model does.

Each candidate's answers then go back into lm-eval's Instances, and lm-eval's filters,
`process_results` and aggregations give its metrics, as `lm_eval.evaluator.evaluate` does
(no bootstrap). A prompt longer than the model's context is refused (lm-eval's hf model
would cut it from the left without a word); so is sampling (do_sample / temperature > 0),
images or audio. Datasets are read offline only (HF_DATASETS_OFFLINE): a YAML over local
files (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`) or a filled cache.

Splits: 'test' is the split lm-eval reports (test_split, else validation_split); 'dev',
the search's, is validation_split when the task also has a test_split, and refused
otherwise (searching on the reported split would report searched data).
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import json
import logging
import os
import threading
from typing import Any, Callable, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from recycle_jax.evaluation import kinds, loglikelihood, task_data, task_splits
from recycle_jax.evaluation import samples as item_samples
from recycle_jax.evaluation.task_data import TaskData
from recycle_jax.models import decoding
from recycle_jax.runtime.errors import UserError, check

PREFIX = "lm_eval:"
KIND = "lm_eval"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's


@dataclasses.dataclass(frozen=True)
class LmEvalOptions:
  """How lm-eval tasks are built, as lm-eval's command line says it (`configure`; gin:
  `LmEvalOptions.include_path = ['my_tasks/']`)."""
  include_path: tuple[str, ...] = ()
  num_fewshot: int | None = None
  apply_chat_template: bool = False
  fewshot_as_multiturn: bool = False
  context_length: int | None = None  # the model's (max_position_embeddings); None: unchecked


_OPTIONS = [LmEvalOptions()]


def configure(**kw) -> LmEvalOptions:
  """Sets the options every later lm-eval task is built with (the entry points call it)."""
  opts = dataclasses.replace(_OPTIONS[0], **{k: v for k, v in kw.items() if v is not None})
  if isinstance(opts.include_path, str):
    opts = dataclasses.replace(opts, include_path=(opts.include_path,))
  for p in opts.include_path:
    check(os.path.isdir(p), f"include path {p} is not a directory", "--include_path",
          "pass the directory that holds your task YAMLs")
  check(opts.num_fewshot is None or opts.num_fewshot >= 0,
        f"num_fewshot={opts.num_fewshot}", "--num_fewshot", "pass 0 or more")
  if opts != _OPTIONS[0]:
    task_splits.forget_splits()  # splits built under the old options
  _OPTIONS[0] = opts
  return opts


def options() -> LmEvalOptions:
  return _OPTIONS[0]


def is_lm_eval(name: str) -> bool:
  return name.startswith(PREFIX)


def parse(name: str) -> tuple[str, str | None, str | None]:
  """'lm_eval:NAME[@METRIC[/FILTER]]' -> (NAME, METRIC or None, FILTER or None)."""
  rest = name[len(PREFIX):]
  task, _, metric = rest.partition("@")
  metric, _, filt = metric.partition("/")
  check(bool(task), f"task {name!r} names no lm-eval task", "--tasks",
        "write lm_eval:NAME, e.g. lm_eval:arc_easy")
  return task, metric or None, filt or None


# ----------------------------------------------------------------------------- loading

def _offline() -> None:
  """lm-eval reads datasets through `datasets`: never from a hub here."""
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  os.environ["HF_HUB_OFFLINE"] = "1"
  import datasets
  datasets.config.HF_DATASETS_OFFLINE = True
  datasets.config.HF_HUB_OFFLINE = True
  datasets.disable_progress_bars()  # stderr is for problems (one line on bad input)
  for name in ("lm_eval", "datasets"):  # their notes on defaults are not problems
    logging.getLogger(name).setLevel(logging.ERROR)


def _import_lm_eval():
  try:
    _offline()
    import lm_eval.tasks  # noqa: F401
  except ImportError:
    raise UserError("lm-eval tasks need the lm-eval package", "--tasks=lm_eval:...",
                    "pip install 'recycle_jax[lm_eval]' (lm_eval==0.4.13)") from None
  import lm_eval
  return lm_eval


@functools.lru_cache(None)
def _manager(include_path: tuple[str, ...], defaults: bool):
  _import_lm_eval()
  from lm_eval.tasks import TaskManager
  return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def _find(task: str, include_path: tuple[str, ...]):
  """The TaskManager that knows `task`: the user's YAMLs alone first (fast), then with
  lm-eval's built-in tasks; an unknown name is refused with the nearest ones."""
  if include_path:
    tm = _manager(include_path, False)
    if task in tm.all_tasks:
      return tm
  tm = _manager(include_path, True)
  if task not in tm.all_tasks:  # the close names, else the one nearest
    near = (difflib.get_close_matches(task, tm.all_tasks, n=3, cutoff=0.6) or
            difflib.get_close_matches(task, tm.all_tasks, n=1, cutoff=0.0))
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise UserError(f"lm-eval does not know task {task!r}{hint}", "--tasks",
                    "name an lm-eval task (`lm_eval ls tasks`) or a YAML task in "
                    "--include_path")
  return tm


def check_known(name: str) -> str:
  """The lm-eval task an `lm_eval:NAME[@METRIC]` name names, known to lm-eval (its
  built-in tasks or the include path's YAMLs); an unknown one is refused in one line with
  the nearest names."""
  task = parse(name)[0]
  _find(task, options().include_path)
  return task


def _dataset_hint(tm, task: str) -> str:
  """Where a task's dataset is to come from, from its YAML (for the error line)."""
  entry = tm.task_index.get(task)
  cfg = {}
  try:
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(str(entry.yaml_path), resolve_func=False) if entry and entry.yaml_path \
        else {}
  except Exception:  # noqa: BLE001 (the hint is a courtesy)
    cfg = {}
  files = (cfg.get("dataset_kwargs") or {}).get("data_files")
  where = f"dataset_path={cfg.get('dataset_path')!r}"
  if cfg.get("dataset_name"):
    where += f", dataset_name={cfg.get('dataset_name')!r}"
  if files:
    where += f", data_files={files!r}"
  return where


def _load_task(task: str, opts: LmEvalOptions):
  tm = _find(task, opts.include_path)
  try:
    loaded = tm.load([task])
  except Exception as e:  # datasets' and lm-eval's own errors (offline, missing files)
    msg = " ".join(str(e).split())[:200]
    raise UserError(f"lm-eval task {task!r}: its dataset is not available offline "
                    f"({_dataset_hint(tm, task)}): {type(e).__name__}: {msg}", "--tasks",
                    "provide the files locally (dataset_path: json with dataset_kwargs: "
                    "{data_files: {test: /path/file.jsonl}}) or fill the datasets cache "
                    "on a machine with network") from None
  tasks = loaded["tasks"]
  check(len(tasks) == 1, f"lm-eval name {task!r} is a group of {len(tasks)} tasks "
        f"({', '.join(sorted(tasks)[:5])}...)", "--tasks",
        "name its tasks one by one (lm_eval:NAME each)")
  return next(iter(tasks.values()))


def _configured(t, opts: LmEvalOptions):
  """lm-eval's simple_evaluate overrides: num_fewshot (never over a config's 0), the
  fewshot seed."""
  if opts.num_fewshot is not None and t.get_config("num_fewshot") != 0:
    t.set_config(key="num_fewshot", value=opts.num_fewshot)
  elif t.get_config("num_fewshot") is None:
    t.set_config(key="num_fewshot", value=0)
  t.set_fewshot_seed(seed=FEWSHOT_SEED)
  return t


def _docs(t, name: str, split: str) -> list[tuple[int, dict]]:
  """(doc_id, doc) of `split`: 'test' is what lm-eval reports (test, else validation);
  'dev' is validation when the task also has a test split."""
  if split == "test":
    return list(enumerate(t.eval_docs))
  check(split == "dev", f"lm-eval task {name!r} has no split {split!r}", "--split",
        "use dev or test")
  check(t.has_validation_docs() and t.has_test_docs(),
        f"lm-eval task {name!r} has no dev split apart from the split it reports on",
        "--tasks / Experiment.tasks",
        "give its YAML both validation_split (searched) and test_split (reported), or use "
        "it as a report task only")
  return list(enumerate(t.validation_docs()))


# ----------------------------------------------------------------------------- requests

def _encoder_class():
  from lm_eval.api.model import TemplateLM
  from lm_eval.models.utils import has_bos_prefix

  class Encoder(TemplateLM):
    """lm-eval's tokenization of requests (TemplateLM.loglikelihood and `_encode_pair`)
    over the pool's tokenizer, encoding as lm-eval's hf model does (`tok_encode`: the
    tokenizer's own special tokens, none when the text starts with BOS). It records the
    token pairs instead of scoring them."""
    backend = "causal"

    def __init__(self, vocab):
      super().__init__()
      self.vocab = vocab
      self.hf = getattr(vocab, "tokenizer", None)  # a tokenizers.Tokenizer, or seqio's own
      bos = getattr(vocab, "bos_id", None)
      self.bos = bos if bos is not None and bos >= 0 else None
      self.bos_text = (self.hf.decode([self.bos], skip_special_tokens=False)
                       if self.hf is not None and self.bos is not None else None)

    @property
    def eot_token_id(self) -> int:
      return self.vocab.eos_id

    @property
    def prefix_token_id(self) -> int:
      return self.bos if self.bos is not None else self.vocab.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list:
      add = True if add_special_tokens is None else add_special_tokens
      if add_special_tokens is None and self.bos_text and has_bos_prefix(string,
                                                                          self.bos_text):
        add = False
      if self.hf is not None:
        return list(self.hf.encode(string, add_special_tokens=add).ids)
      head = [self.bos] if add and self.bos is not None and getattr(self.vocab, "add_bos",
                                                                     False) else []
      return head + list(self.vocab.encode(string))

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
      ids = [int(i) for i in ids]
      if self.hf is not None:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
      return self.vocab.decode(ids)

    def _loglikelihood_tokens(self, requests, **_):
      return [(context, continuation) for _, context, continuation in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      raise NotImplementedError  # windows: `_rolling_windows`

    def generate_until(self, requests, disable_tqdm: bool = False):
      raise NotImplementedError  # greedy decoding on device

  return Encoder


def _chat_template(vocab) -> Callable:
  """lm-eval's chat_template callable (its hf model's apply_chat_template) over the
  tokenizer's template; a missing or failing template is one error line."""
  check(getattr(vocab, "chat_template", None) is not None,
        "--apply_chat_template needs a chat template, and the tokenizer has none",
        getattr(vocab, "folder", "the tokenizer"),
        "use a tokenizer with chat_template, or drop --apply_chat_template")
  def render(chat_history, add_generation_prompt: bool = True) -> str:
    return vocab.render_chat(chat_history, add_generation_prompt=add_generation_prompt,
                             continue_final_message=not add_generation_prompt)
  return render


def _rolling_windows(enc, text: str, max_length: int) -> list[tuple[list, list]]:
  """lm-eval's hf model's windows of a loglikelihood_rolling request."""
  from lm_eval import utils
  return [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
      token_list=enc.tok_encode(text), prefix_token=enc.prefix_token_id,
      max_seq_len=max_length, context_len=1)]


def _generation(name: str, kwargs: dict) -> tuple[int, list[str]]:
  """(max_gen_toks, until) of a generate_until request; sampling is refused."""
  from lm_eval.models.utils import normalize_gen_kwargs
  kw = normalize_gen_kwargs(dict(kwargs or {}), DEFAULT_MAX_GEN_TOKS)
  check(not kw.get("do_sample") and not float(kw.get("temperature") or 0.0),
        f"lm-eval task {name!r} samples (do_sample/temperature > 0), which recycle_jax "
        "cannot compute: it decodes greedily", "generation_kwargs",
        "set do_sample: false and temperature: 0 in the task's generation_kwargs")
  return int(kw["max_gen_toks"]), [u for u in kw.get("until") or [] if isinstance(u, str)]


def _eos_ids(vocab) -> list[int]:
  """EOS ids generation stops at: the tokenizer's, and the checkpoint's
  generation_config.json ones (transformers' generate stops at those too)."""
  ids = [vocab.eos_id]
  folder = getattr(vocab, "folder", None)
  path = os.path.join(folder, "generation_config.json") if folder else ""
  if path and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      extra = json.load(f).get("eos_token_id")
    extra = extra if isinstance(extra, list) else [extra]
    ids += [int(i) for i in extra if isinstance(i, int) and i not in ids]
  return ids


@dataclasses.dataclass
class Built:
  """One lm-eval task split's requests, built once: lm-eval's Task and Instances, and
  where each Instance's answer lies in the device outputs.

  where[i]: ('ll', row, group) | ('roll', ((row, 0), ...)) | ('gen', prompt row)
  """
  name: str
  task: Any
  docs: list
  instances: list
  where: list
  fitness: str  # the 'metric,filter' the search optimizes (`fitness_key`)
  encoder: Any
  rows: list  # loglikelihood rows: [(context ids, continuation ids), ...] each
  prompts: list  # generation prompts' ids
  max_gen: list  # per prompt: max_gen_toks
  until: list  # per prompt: stop strings (EOS text included, as lm-eval's hf model)
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


_BUILT: dict = {}


def build(name: str, split: str, max_examples: int | None, vocab, opts: LmEvalOptions) -> Built:
  """lm-eval's requests for `split` of task `name` ('lm_eval:...'), tokenized."""
  task_name, metric, filt = parse(name)
  t = _configured(_load_task(task_name, opts), opts)
  check(not (t.get_config("doc_to_image") or t.get_config("doc_to_audio")),
        f"lm-eval task {task_name!r} reads images or audio, which recycle_jax cannot "
        "compute", "--tasks", "use a text task")
  key = fitness_key(t, name, metric, filt)
  docs = _docs(t, name, split)[:max_examples]
  check(bool(docs), f"lm-eval task {name!r} split {split!r} is empty", "--split")
  chat = _chat_template(vocab) if opts.apply_chat_template else None
  instances = []
  for doc_id, doc in docs:
    ctx = t.fewshot_context(doc, num_fewshot=int(t.get_config("num_fewshot") or 0),
                            system_instruction=None,
                            apply_chat_template=opts.apply_chat_template,
                            fewshot_as_multiturn=opts.fewshot_as_multiturn,
                            chat_template=chat, gen_prefix=t.doc_to_prefix(doc))
    inst = t.construct_requests(doc=doc, ctx=ctx,
                                metadata=(t.config["task"], doc_id, t.config.repeats),
                                apply_chat_template=opts.apply_chat_template,
                                chat_template=chat)
    instances += inst if isinstance(inst, list) else [inst]
  t._instances = instances  # lm-eval's apply_filters reads them here
  enc = _encoder_class()(vocab)
  eos_text = enc.tok_decode([vocab.eos_id], skip_special_tokens=False)
  from lm_eval.models.utils import handle_stop_sequences
  rows, where, prompts, max_gen, until = [], [], [], [], []
  doc_row = {}
  limit = opts.context_length
  for inst in instances:
    kind = inst.request_type
    if kind == "loglikelihood":
      (ctx, cont), = enc.loglikelihood([inst], disable_tqdm=True)
      if limit:
        _check_length(name, inst, len(ctx) + len(cont) - 1, limit)  # the last is not input
      if inst.doc_id not in doc_row:
        doc_row[inst.doc_id] = len(rows)
        rows.append([])
      r = doc_row[inst.doc_id]
      where.append(("ll", r, len(rows[r])))
      rows[r].append((ctx, cont))
    elif kind == "loglikelihood_rolling":
      windows = _rolling_windows(enc, inst.args[0], limit or 2048)
      where.append(("roll", tuple((len(rows) + k, 0) for k in range(len(windows)))))
      rows += [[w] for w in windows]
    elif kind == "generate_until":
      context, kwargs = inst.args[0], inst.args[1]
      n, stops = _generation(name, kwargs)
      ids = enc.tok_encode(context)
      if limit:
        _check_length(name, inst, len(ids) + n, limit)
      where.append(("gen", len(prompts)))
      prompts.append(ids)
      max_gen.append(n)
      until.append(handle_stop_sequences(list(stops), eos=eos_text))
    else:
      raise UserError(f"lm-eval task {task_name!r} asks for {kind!r} outputs, which "
                      "recycle_jax cannot compute", "--tasks",
                      "use a loglikelihood, multiple_choice, loglikelihood_rolling or "
                      "generate_until task")
  return Built(name, t, docs, instances, where, key, enc, rows, prompts, max_gen, until)


def _check_length(name: str, inst, n: int, limit: int) -> None:
  check(n <= limit, f"lm-eval task {name!r} document {inst.doc_id} needs {n} tokens, more "
        f"than the model's context ({limit})", "--tasks",
        "lm-eval's hf model would cut it from the left; drop such documents (a shorter "
        "num_fewshot) or use a model with a longer context")


# ----------------------------------------------------------------------------- device

def pack_pairs(rows: Sequence[Sequence[tuple[list, list]]]) -> tuple:
  """Rows [E][G_e] of (context ids, continuation ids) in the packed layout
  (`task_data.pack`: one row each, the shared context once, each continuation its own
  segment); a bucket's `labels` hold its rows' indices in `rows`."""
  g = max(len(r) for r in rows)
  length = task_data._round_up(max(len(c) + len(k) for r in rows for c, k in r))
  tokens = np.zeros((len(rows), g, length), np.int32)
  mask = np.zeros((len(rows), g, length), bool)
  for e, row in enumerate(rows):
    for j, (c, k) in enumerate(row):
      tokens[e, j, :len(c) + len(k)] = list(c) + list(k)
      mask[e, j, len(c):len(c) + len(k)] = True
  d = TaskData(tokens=tokens, target_mask=mask, labels=np.arange(len(rows), dtype=np.int32),
               choice_count=np.array([len(r) for r in rows], np.int32), kind="choice")
  return task_data.pack(d)


def materialize(name: str, split: str, max_examples: int | None, vocabulary,
                vocab_key: str) -> TaskData:
  """An lm-eval task split as a TaskData of kind 'lm_eval': its loglikelihood rows packed
  (`pack_pairs`), its generation prompts padded; the Built requests stay on the host for
  `host_scores` and `results`."""
  check(vocabulary is not None, f"lm-eval task {name!r} needs the model's tokenizer",
        "--tasks", "evaluate it on a checkpoint or pool with a tokenizer")
  b = build(name, split, max_examples, vocabulary, options())
  fields = {}
  if b.rows:
    fields["packed"] = pack_pairs(b.rows)
  if b.prompts:
    common = set.intersection(*(set(u) for u in b.until))  # stop early only on shared ones
    eos = _eos_ids(vocabulary)
    stops = [[i] for i in eos[1:]] + [list(vocabulary.encode(u)) for u in sorted(common)]
    width = task_data._round_up(max(map(len, b.prompts)))
    fields.update(prompts=task_data._pad(b.prompts, width),
                  prompt_lens=np.array([len(p) for p in b.prompts], np.int32),
                  stop_ids=decoding.stop_ids([x for x in stops if x], eos[0]),
                  stop_text=decoding.stop_tables(vocabulary,
                                                 tuple(u for u in sorted(common) if u)),
                  max_new=max(b.max_gen))
  empty = np.zeros((1, 1), np.int32)
  d = TaskData(tokens=empty, target_mask=empty.astype(bool), kind=KIND, name=name,
               split=split, examples=len(b.docs), vocab_key=vocab_key, **fields)
  _BUILT[(name, split, len(b.docs), vocab_key)] = b
  return d


def device(ctx, params, d: TaskData) -> jax.Array:
  """Every answer the split's requests need, for one candidate, as one float32 vector
  (`_unflatten` reads it back): per packed bucket the summed log-probs [R, G] and
  is_greedy [R, G] (`loglikelihood.packed_loglikelihood`), then the greedy continuations
  [E', max_new] (token ids, exact in float32 below 2^24)."""
  parts = []
  for p in d.packed or ():
    summed, greedy, _ = loglikelihood.packed_loglikelihood(ctx.decoder, params, p)
    parts += [summed.reshape(-1), greedy.reshape(-1).astype(jnp.float32)]
  if d.prompts is not None:
    gen = decoding.generate(ctx.decoder, params, decoding.Prompts(
        d.prompts, d.prompt_lens, d.stop_ids, d.max_new, d.stop_text, d.decode_groups))
    parts.append(gen.reshape(-1).astype(jnp.float32))
  return jnp.concatenate(parts)


def _unflatten(d: TaskData, flat: np.ndarray):
  """`device`'s vector -> ([(summed [R, G], greedy [R, G]) per bucket], tokens or None)."""
  flat, at, ll = np.asarray(flat), 0, []
  for p in d.packed or ():
    r, g = np.asarray(p.labels).shape[0], p.num_groups
    ll.append((flat[at:at + r * g].reshape(r, g),
               flat[at + r * g:at + 2 * r * g].reshape(r, g) > 0.5))
    at += 2 * r * g
  gen = None
  if d.prompts is not None:
    gen = flat[at:].reshape(np.asarray(d.prompts).shape[0], d.max_new).astype(np.int64)
  return ll, gen


# ----------------------------------------------------------------------------- host

def _built(d: TaskData) -> Built:
  return _BUILT[(d.name, d.split, d.examples, d.vocab_key)]


def _answers(b: Built, d: TaskData, flat) -> list:
  """One candidate's device outputs -> each Instance's response, as lm-eval's hf model
  returns it: (logprob, is_greedy), a summed logprob, or the generated text (decoded
  without special tokens, cut at the first `until` string)."""
  from lm_eval.models.utils import postprocess_generated_text
  ll, gen = _unflatten(d, flat)
  rows = {}
  for p, (summed, greedy) in zip(d.packed or (), ll):
    used = np.any(np.asarray(p.slot_group) >= 0, axis=-1)  # not `pad_rows` padding
    for r, row in enumerate(np.asarray(p.labels)):
      if used[r]:
        rows[int(row)] = (summed[r], greedy[r])
  texts = []
  for i, (n, until) in enumerate(zip(b.max_gen, b.until)):
    ids = [int(t) for t in gen[i, :n] if t >= 0]
    texts.append(postprocess_generated_text(b.encoder.tok_decode(ids), until, None))
  out = []
  for w in b.where:
    if w[0] == "ll":
      summed, greedy = rows[w[1]]
      out.append((float(summed[w[2]]), bool(greedy[w[2]])))
    elif w[0] == "roll":
      out.append(float(sum(float(rows[r][0][g]) for r, g in w[1])))
    else:
      out.append(texts[w[1]])
  return out


def _evaluate(b: Built, d: TaskData, out, samples: bool):
  """lm-eval's post-processing of one candidate's answers (`evaluator.evaluate`: filters,
  process_results per document and filter, aggregation without bootstrap) ->
  ({'metric,filter': value}, logged samples or [])."""
  from lm_eval.evaluator_utils import _compute_task_aggregations
  answers = _answers(b, d, out)
  t = b.task
  with b.lock:  # the Instances are lm-eval's, shared by every candidate
    for inst, a in zip(b.instances, answers):
      inst.resps = [a] * (inst.repeats or 1)
      inst.filtered_resps = {}
    t._instances = b.instances
    t.apply_filters()
    by_doc = collections.defaultdict(list)
    for inst in b.instances:
      by_doc[inst.doc_id].append(inst)
    for reqs in by_doc.values():
      reqs.sort(key=lambda x: x.idx)
    raw, logged = collections.defaultdict(list), []
    for key in b.instances[0].filtered_resps:
      for doc_id, doc in b.docs:
        reqs = by_doc[doc_id]
        metrics = t.process_results(doc, [r.filtered_resps[key] for r in reqs])
        for m, v in metrics.items():
          raw[(m, key)].append(v)
        if samples:
          logged.append(item_samples.record(
              doc_id, doc, t.doc_to_target(doc), [r.args for r in reqs],
              [r.resps for r in reqs], [r.filtered_resps[key] for r in reqs], key,
              metrics))
    agg, _ = _compute_task_aggregations(t, raw, bootstrap_iters=0)
  return {k: v for k, v in agg.items() if "_stderr," not in k}, logged


def _metric_keys(t) -> list[str]:
  """The task's 'metric,filter' keys, lm-eval's primary one first (its first metric under
  its first filter)."""
  filters = [f.name for f in getattr(t, "_filters", [])] or ["none"]
  return [f"{m},{f}" for f in filters for m in t._metric_fn_list]


def fitness_key(t, name: str, metric: str | None, filt: str | None) -> str:
  """The metric the search optimizes: the task name's @METRIC[/FILTER], else lm-eval's
  primary metric; an unknown one is refused before any work."""
  keys = _metric_keys(t)
  match = [k for k in keys if metric is None or (k.split(",")[0] == metric and (
      filt is None or k.split(",", 1)[1] == filt))]
  check(bool(match), f"lm-eval task {name!r} has no metric "
        f"{metric}{'/' + filt if filt else ''}", "--tasks",
        "choose from: " + ", ".join(k.replace(",", "/") for k in keys))
  return match[0]


def fitness(b: Built, metrics: dict) -> float:
  """The fitness of metrics: 100 x the chosen metric (negated where lower is better)."""
  higher = b.task.higher_is_better().get(b.fitness.split(",")[0], True)
  value = float(metrics[b.fitness])
  return 100.0 * value if higher else -value


def host_scores(d: TaskData, outputs) -> np.ndarray:
  """[K] fitness of K candidates' device outputs [K, N] on split `d`."""
  b = _built(d)
  return np.array([fitness(b, _evaluate(b, d, o, False)[0]) for o in np.asarray(outputs)],
                  np.float32)


def results(d: TaskData, out, samples: bool = False) -> tuple[dict, list]:
  """One model's metrics ({'metric,filter': value}, lm-eval's names) and, with
  `samples`, its per-document records as lm-eval's evaluator logs them
  (`item_samples.jsonl` writes them as lm-eval does)."""
  b = _built(d)
  return _evaluate(b, d, out, samples)


# ----------------------------------------------------------------------------- registering

def register() -> None:
  """Registers the source (`task_splits.SOURCES`, for `lm_eval:` names) and its kind
  (`kinds.REGISTRY`); idempotent. lm-eval itself is imported when a task is read."""
  if KIND not in kinds.REGISTRY:
    kinds.REGISTRY.register(kinds.Kind(KIND, _not_seqio, device, on_host=True))
  if "lm_eval" not in task_splits.SOURCES:
    task_splits.SOURCES.register(task_splits.Source("lm_eval", materialize, host_scores))


def _not_seqio(name: str, *_):
  raise UserError(f"task {name!r} is declared with kind {KIND!r}", f"task {name!r}",
                  f"name lm-eval's tasks {PREFIX}NAME")


# ----------------------------------------------------------------------------- one model

def evaluate(score: Callable, params, datas: Sequence[TaskData], samples: bool = False,
             decoder=None) -> tuple[np.ndarray, dict[str, tuple[dict, list]]]:
  """One model's scores [T] (`score` a jitted `scorers.make_scorer`, run once) and, per
  lm-eval task, its metrics under lm-eval's names and (`samples`) its per-document
  records in lm-eval's samples format; with `samples`, every built-in task's records and
  metrics too (`item_samples.built_in`: a generate split's from the tokens `score`
  returned, a choice or exact split's log-likelihoods computed with `decoder`)."""
  from recycle_jax.evaluation import scorers
  out = jax.device_get(score(params, tuple(datas)))
  details, tokens = {}, {}
  if kinds.on_host(datas):
    scores, outputs = out
    full = scorers.finish(scores[None], [o[None] for o in outputs], datas)[0]
    host = [d for d in datas if kinds.REGISTRY[d.kind].on_host]
    tokens = {d.name: o for d, o in zip(host, outputs)}
    details = {d.name: results(d, tokens[d.name], samples) for d in host if d.kind == KIND}
  else:
    full = np.asarray(out, np.float32)
  if samples:
    for d in datas:
      if d.kind != KIND:
        check(decoder is not None or d.kind == "generate", "logging the samples of task "
              f"{d.name!r} needs the model's decoder", "harness.evaluate",
              "pass decoder=transformer.Decoder(config)")
        logged = item_samples.built_in(decoder, params, d, tokens.get(d.name))
        details[d.name] = (item_samples.aggregate(logged), logged)
  return full, details


def samples_file(name: str) -> str:
  """The STEM of a task's samples_STEM.jsonl: an lm-eval task's own name (no prefix, no
  @METRIC), a built-in task's name."""
  return parse(name)[0] if is_lm_eval(name) else name


def write_samples(folder: str, samples: dict[str, list], overwrite: bool = False) -> None:
  """`folder`/samples_TASK.jsonl per task (`samples_file`), written whole or not at all."""
  item_samples.write(folder, {samples_file(n): s for n, s in samples.items()}, overwrite)
