"""Tiny Hugging Face folders built locally: a BPE tokenizer trained with `tokenizers` on
local text, and random Llama checkpoints saved with transformers (nothing downloaded)."""
import os

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = ("the cat sat on the mat . the dog ate the bone . Ann is older than Bob . "
        "Bob is taller than Cal . who is oldest ? who is tallest ? 1 2 3 4 5 6 7 8 9 0 "
        "print ( x [ : : - 1 ] ) fox owl bee sun cow pig hen jam tea map box cup pen")


def train_bpe(folder, vocab_size=300, text=TEXT, chat_template=CHAT, seed_words=()):
  """A byte-level BPE tokenizer trained on `text`, saved as a transformers fast tokenizer
  (tokenizer.json + tokenizer_config.json) with BOS/EOS/PAD and a chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  special = ["<pad>", "<s>", "</s>"]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([text, *seed_words], trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")
  if chat_template:
    fast.chat_template = chat_template
  os.makedirs(folder, exist_ok=True)
  fast.save_pretrained(folder)
  return fast


def tiny_llama(folder, vocab_size, seed=0, tie=False, layers=2, d=32, heads=4, kv=2,
               max_positions=256, **overrides):
  """A random float32 LlamaForCausalLM (eos 2, bos 1, pad 0) saved with save_pretrained."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=d, intermediate_size=48, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie,
      rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=0.2,
      max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
      pad_token_id=0, **overrides)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(folder)
  return model


def read_hf_tensors(src: str) -> dict:
  """Every tensor of a folder's safetensors files, as stored."""
  import glob
  from safetensors import safe_open
  out = {}
  for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
    with safe_open(path, framework="np") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out
