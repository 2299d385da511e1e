"""Scoring a model on task splits: what each task is scored as (`scoring`), splits as
fixed-shape arrays (`task_data`), read from seqio (`task_splits`), the scoring kinds
(`kinds`) and the jitted scorers (`scorers`), tokenizers as seqio vocabularies
(`vocabularies`), and the host-side verifiers (`verifiers/`: text, numeric, IFEval, code
in a sandbox).

Imports: runtime, models, checkpoint_io."""
