"""Builds this example's pool: a BPE tokenizer trained here on local text, and three tiny
Llama checkpoints (transformers, random init, each nudged briefly on different data) saved
as Hugging Face folders with that tokenizer, plus pool.json listing them.

  python build_pool.py pool        # -> pool/pool.json, pool/{qa,mixed,sounds}/

Nothing is downloaded. Replace it with your own folders: any Llama, Mistral, Qwen2/3 or
Gemma 2/3 folder written by save_pretrained (config.json, safetensors, tokenizer files).
"""
import argparse
import json
import os
import random

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def records(split):
  with open(os.path.join(HERE, "data", f"{split}.jsonl")) as f:
    return [json.loads(line) for line in f]


def texts(kind, rng):
  """Training text of one member: right answers, wrong answers, or the sounds alone."""
  rows = records("train")
  if kind == "qa":
    return [f"Q: {r['question']}\nA: {r['answer']}" for r in rows]
  if kind == "mixed":
    return [f"Q: {r['question']}\nA: {rng.choice(r['choices'])}" for r in rows]
  return [f"The {r['answer']} says {r['question'].split()[-1][:-1]}." for r in rows]


def train_tokenizer(folder, corpus):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", pad_token="<pad>")
  fast.chat_template = CHAT
  fast.save_pretrained(folder)
  return fast


def build_member(folder, tok, lines, seed, steps=25):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rope_theta=10_000.0)
  model = transformers.LlamaForCausalLM(cfg)
  batch = tok([t + tok.eos_token for t in lines], return_tensors="pt", padding=True)
  labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
  for _ in range(steps):  # a brief nudge, so the members differ in what they know
    loss = model(**batch, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
  model.eval().save_pretrained(folder)
  tok.save_pretrained(folder)  # the tokenizer travels with every checkpoint
  return float(loss.detach())


def main(out, steps=25):
  rng = random.Random(0)
  os.makedirs(out, exist_ok=True)
  corpus = [t for kind in ("qa", "mixed", "sounds") for t in texts(kind, random.Random(1))]
  tok = train_tokenizer(os.path.join(out, "tokenizer"), corpus * 4)
  entries = []
  for i, kind in enumerate(("qa", "mixed", "sounds")):
    loss = build_member(os.path.join(out, kind), tok, texts(kind, rng), seed=i, steps=steps)
    print(f"{kind}: final loss {loss:.3f}")
    entries.append({"name": kind, "path": kind})
  with open(os.path.join(out, "pool.json"), "w") as f:
    json.dump({"checkpoints": entries}, f, indent=1)
  return os.path.join(out, "pool.json")


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("out", nargs="?", default="pool")
  print(f"pool manifest: {main(p.parse_args().out)}")
