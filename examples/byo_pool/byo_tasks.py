"""This example's task: multiple choice over data/*.jsonl (2 to 4 choices per question),
tokenized with whatever pool it is evaluated on. `import byo_tasks` in a gin file
registers it (run from this folder, or put it on PYTHONPATH)."""
import os

from recycle_jax import user_tasks

HERE = os.path.dirname(os.path.abspath(__file__))

user_tasks.register(user_tasks.JsonlTask(
    name="byo_qa",
    splits={s: os.path.join(HERE, "data", f"{s}.jsonl") for s in ("train", "dev", "test")},
    prompt="Q: {question}\nA: ", kind="choice", choices="choices", label="answer"))
