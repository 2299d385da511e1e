"""The stable import path for task modules users write (`--task_module=my_tasks`):
`user_tasks.register(user_tasks.JsonlTask(...))` for JSONL files, `user_tasks.declare(name,
user_tasks.Scoring(...))` for a seqio Task of their own, `user_tasks.POOL` as a task's
vocabulary (the pool's tokenizer). Implemented in `tasks.jsonl`, `tasks.spec`,
`evaluation.scoring` and `evaluation.vocabularies`."""
from recycle_jax.evaluation.scoring import Scoring, declare
from recycle_jax.evaluation.vocabularies import POOL
from recycle_jax.tasks.jsonl import import_modules, read_jsonl, register, register_all
from recycle_jax.tasks.spec import JsonlTask

__all__ = ["JsonlTask", "POOL", "Scoring", "declare", "import_modules", "read_jsonl",
           "register", "register_all"]
