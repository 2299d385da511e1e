"""The stable import path of task vocabularies: a task declaring `vocabularies.POOL` is
tokenized with the pool's tokenizer (implemented in `evaluation.vocabularies`)."""
from recycle_jax.evaluation.vocabularies import POOL, PoolVocabulary

__all__ = ["POOL", "PoolVocabulary"]
