"""Loads the search's merged folder back into transformers and generates from it.

  python load_merged.py run/merged
"""
import sys

import transformers

path = sys.argv[1] if len(sys.argv) > 1 else "run/merged"
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path)
ids = tok("Q: Which animal says moo?\nA: ", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
stopped = bool(len(out)) and int(out[-1]) == tok.eos_token_id
print(f"{tok.decode(out, skip_special_tokens=True)!r}: {len(out)} new tokens, "
      f"{'stopped at EOS' if stopped else 'no EOS'}")
